"""Artifacts beside the labels: meshes, a Blender scene with a slice add-on, PNG slices."""
