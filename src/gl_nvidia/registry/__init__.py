"""The registry stage: push image layouts, pull and mirror images over the OCI distribution API.

Public API (the release stage calls these): `push(layout_dir, "REGISTRY/REPO") -> [PushResult]`
(uploaded/skipped/mounted blob counts), `mirror(src_repo, dst_repo, driver_branch=...)`,
`pull(ref, layout)`, `copy_image` (the one routine all three use), `ClientOptions`.
Credentials are per registry host (`credentials.py`); what is fetched is checked against its digest.
"""

from gl_nvidia.registry.transfer import ClientOptions, PushResult, copy_image, mirror, pull, push

__all__ = ["ClientOptions", "PushResult", "copy_image", "mirror", "pull", "push"]
