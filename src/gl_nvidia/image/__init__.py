"""The image stage: driver bundle -> reproducible, layered OCI images in an image layout on disk.

Public API (the release stage calls these): `build_image` / `build_images` -> `BuiltImage` (manifest
digest, tags, layers), `ImageOptions`; the model in `oci` (`Layout`, `Manifest`, `Descriptor`).
"""

from gl_nvidia.image.build import BuiltImage, ImageOptions, build_image, build_images

__all__ = ["BuiltImage", "ImageOptions", "build_image", "build_images"]
