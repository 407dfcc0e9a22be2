"""Ray Serve application for trained checkpoints, placed through the controller."""
