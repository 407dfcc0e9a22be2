"""llmos control plane: the ClusterSpec, placement engine, controller, binding, launcher, admin API."""
