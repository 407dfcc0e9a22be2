"""KubeRay and Kueue manifests rendered from the ClusterSpec."""
