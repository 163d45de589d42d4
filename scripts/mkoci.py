#!/usr/bin/env python3
"""Build a tiny runnable OCI image layout with the standard library only.

    python3 mkoci.py LAYOUT TAG [BIG_MIB [PLATFORMS]]

Writes (or extends) the OCI image layout directory LAYOUT with an image tagged TAG:
two small gzip layers and, if BIG_MIB > 0, a third layer holding BIG_MIB MiB of random
bytes. Prints the manifest digest. Push it with
    skopeo copy --dest-tls-verify=false oci:LAYOUT:TAG docker://HOST/REPO:TAG
skopeo keeps the manifest bytes, so the registry's digest equals the printed one.

With PLATFORMS (comma-separated os/arch, e.g. linux/amd64,linux/arm64) TAG names an image
index with one such image per platform, each with layers of its own, and the index's digest
is printed; push it with `skopeo copy --all`.

Every run embeds a random nonce in the small layers, so two runs never produce the same
blobs: a cache left over from another test can never hide a miss.
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def write_blob(layout, data):
    """Store data content-addressed under blobs/sha256; return (digest, size)."""
    hexdigest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", hexdigest)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return "sha256:" + hexdigest, len(data)


def make_layer(files):
    """Return (uncompressed tar, gzip of it) for [(name, bytes)]; deterministic metadata."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, compresslevel=1, mtime=0)


def make_image(layout, tag, big_mib, os_name, arch):
    """Write one image's layers, config and manifest; return the manifest's (digest, size)."""
    nonce = os.urandom(16).hex().encode()
    layer_files = [
        [("etc/hello.txt", b"hello " + nonce + b"\n")],
        [("etc/motd", tag.encode() + b" " + arch.encode() + b" " + nonce + b"\n")],
    ]
    if big_mib > 0:
        layer_files.append([("data/big.bin", os.urandom(big_mib << 20))])

    layers, diff_ids = [], []
    for files in layer_files:
        tar_bytes, gz_bytes = make_layer(files)
        diff_ids.append("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
        digest, size = write_blob(layout, gz_bytes)
        layers.append({"mediaType": LAYER_TYPE, "digest": digest, "size": size})

    config = {
        "architecture": arch,
        "os": os_name,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_digest, config_size = write_blob(layout, json.dumps(config, sort_keys=True).encode())

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    return write_blob(layout, json.dumps(manifest, sort_keys=True).encode())


def main(argv):
    if len(argv) not in (3, 4, 5):
        sys.stderr.write(__doc__)
        return 2
    layout, tag = argv[1], argv[2]
    big_mib = int(argv[3]) if len(argv) >= 4 else 0
    platforms = [p.split("/", 1) for p in argv[4].split(",")] if len(argv) == 5 else None

    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)

    if platforms is None:
        digest, size = make_image(layout, tag, big_mib, "linux", "amd64")
        entry = {"mediaType": MANIFEST_TYPE, "digest": digest, "size": size,
                 "platform": {"architecture": "amd64", "os": "linux"}}
    else:
        manifests = []
        for os_name, arch in platforms:
            digest, size = make_image(layout, tag, big_mib, os_name, arch)
            manifests.append({"mediaType": MANIFEST_TYPE, "digest": digest, "size": size,
                              "platform": {"architecture": arch, "os": os_name}})
        image_index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests}
        digest, size = write_blob(layout, json.dumps(image_index, sort_keys=True).encode())
        entry = {"mediaType": INDEX_TYPE, "digest": digest, "size": size}

    index_path = os.path.join(layout, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:
        index = {"schemaVersion": 2, "manifests": []}
    # Re-tagging replaces the old entry for this tag.
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    entry["annotations"] = {REF_NAME: tag}
    index["manifests"].append(entry)
    with open(index_path, "w") as f:
        json.dump(index, f)

    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
