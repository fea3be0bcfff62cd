"""The image stage: driver bundle -> reproducible, layered OCI images in an image layout on disk.

Public API (the release stage calls these): `build_image` / `build_images` -> `BuiltImage` (manifest
digest, tags, layers), `ImageOptions`. It reads layouts only (a registry base is pulled into one by the
caller); the OCI model it shares with the registry stage is `gl_nvidia.oci`.
"""

from gl_nvidia.image.assemble import BuiltImage, ImageOptions, build_image, build_images

__all__ = ["BuiltImage", "ImageOptions", "build_image", "build_images"]
