"""The image stage."""
