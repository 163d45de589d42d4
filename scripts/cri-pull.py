#!/usr/bin/env python3
"""Pulls an image through containerd's CRI ImageService, as kubelet does.

usage: cri-pull.py UNIX_SOCKET IMAGE_REF

Uses the PyPI package container-runtime-interface-api (installed into the test venv by
scripts/install-test-deps.sh). Prints the image's id on success; on failure, the gRPC error on
stderr and exit status 1.
"""
import sys

from cri_api.channel import Channel
from cri_api.exceptions import ImageServiceException
from cri_api.images import Images


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    socket, ref = sys.argv[1], sys.argv[2]
    images = Images(Channel(f"unix://{socket}"))
    try:
        images.pull_image(ref)
        image = images.get_image(ref)
    except ImageServiceException as e:
        print(f"CRI pull of {ref} failed: {e}", file=sys.stderr)
        return 1
    if not image:
        print(f"CRI pull of {ref} reported success but ImageStatus does not know it", file=sys.stderr)
        return 1
    print(image.get("id", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
