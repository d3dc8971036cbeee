"""WebDataset shards of CoVR triplets.

  python launch/shard.py pack --annotations CSV --video-root DIR --out DIR [--workers N]
                              [--ray [--address HOST:PORT]] [key=value ...]
  python launch/shard.py pack-cirr --cirr-root DIR --split val --out DIR [--image-root DIR]
  python launch/shard.py import-released PACKED_SPLIT --embeddings EMB_DIR --out DIR [--captions TXT2_PTH]
  python launch/shard.py verify DIR
  python launch/shard.py groups DIR --k K     (k-means sampler groups of embedded shards)

Targets as the reference does them (frozen, computed once): `launch/embed_targets.py` rewrites
packed shards with the starting model's target embeddings; train on its output. Or
`import-released` puts the reference's released ones there (one .pth per video, e.g.
blip2-vid-embs-large-all/); train and evaluate on them with model.released_targets=true.

`pack` is resumable: run it again after a crash and it finishes the missing shards.
Settings (samples per shard, epoch mode, frames, JPEG quality, seed) are the `shards.*` config.
"""

import argparse
import json
from pathlib import Path

import _bootstrap


def parser() -> argparse.ArgumentParser:
    parser, sub = _bootstrap.command_parser(__doc__)
    p = sub.add_parser("pack", help="pack an annotation CSV and its videos into shards")
    p.add_argument("--annotations", required=True)
    p.add_argument("--video-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, help="parallel packing processes / Ray tasks")
    p.add_argument(
        "--ray", action="store_true", help="pack with Ray tasks (local Ray unless --address)"
    )
    p.add_argument("--address", help="Ray cluster address (implies --ray)")
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="default: from the file name; test loses nothing (a missing video is an error)",
    )
    p.add_argument(
        "--subset",
        action="store_true",
        help="test: pack the videos that exist; the manifest says subset, evaluation reports "
        "its coverage and lists what was dropped",
    )
    p.add_argument(
        "--images",
        action="store_true",
        help="the CSV names images, <video-root>/<pth>.jpg|png (CC-CoIR on CC3M), one frame each",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = sub.add_parser(
        "pack-cirr", help="pack CIRR triplets (images) for fine-tuning; group = image set"
    )
    p.add_argument("--cirr-root", required=True, help="folder with captions/ and image_splits/")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--image-root", help="where the split file's image paths start (default CIRR_ROOT/img_raw)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = sub.add_parser(
        "import-released", help="packed shards -> shards holding the reference's released targets"
    )
    p.add_argument("src", help="one packed split (its manifest.json)")
    p.add_argument("--embeddings", required=True, help="folder of <folder>/<video id>.pth files")
    p.add_argument("--captions", help="the released txt2_<csv stem>.pth caption embeddings")
    p.add_argument("--out", required=True)
    p = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    p.add_argument("dir")
    p = sub.add_parser("groups", help="k-means sampler groups of embedded targets (FAISS)")
    p.add_argument("dir")
    p.add_argument("--k", type=int, required=True, help="number of clusters")
    p.add_argument("--seed", type=int, default=1234)
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from configs import load_config

    cfg = None
    if args.command in ("pack", "pack-cirr"):  # every setting checked before anything runs
        overrides = list(args.overrides) + (
            [f"shards.workers={args.workers}"] if args.workers else []
        )
        cfg = load_config(args.config, overrides)
    elif not (
        Path(getattr(args, "dir", None) or args.src) / "manifest.json"
    ).is_file():  # said before the heavy imports
        raise FileNotFoundError(
            f"no manifest.json in {getattr(args, 'dir', None) or args.src}: pack the shards "
            "first (shard.py pack)"
        )
    _bootstrap.setup_logging()

    if args.command == "groups":
        from sharding.groups import kmeans_groups

        groups = kmeans_groups(args.dir, args.k, args.seed)
        print(
            f"{len(groups)} targets in {len(set(groups.values()))} clusters -> {args.dir}/groups.json"
        )
        return 0
    if args.command == "import-released":
        from sharding.released import import_released

        manifest = import_released(args.src, args.embeddings, args.out, args.captions)
        print(json.dumps({**manifest["totals"], "embedded": manifest["embedded"]}, indent=2))
        return 0
    if args.command == "verify":
        from sharding.manifest import verify

        report = verify(args.dir)
        print(json.dumps(report, indent=2))
        return 1 if report["corrupt"] else 0
    from sharding.pack import pack, pack_cirr

    if args.command == "pack-cirr":
        manifest = pack_cirr(
            args.cirr_root, args.split, args.out, cfg.shards, args.image_root, progress=True
        )
        print(json.dumps(manifest["totals"], indent=2))
        return 0
    backend = "ray" if (args.ray or args.address) else "local"
    manifest = pack(
        args.annotations,
        args.video_root,
        args.out,
        cfg.shards,
        backend,
        args.address,
        progress=True,
        split=args.split,
        subset=args.subset,
        images=args.images,
    )
    print(json.dumps({**manifest["totals"], "seconds": manifest["seconds_this_run"]}, indent=2))
    for item in manifest["skipped"][:10]:
        print(f"skipped {item['key']}: {item['reason']}")
    return 0


if __name__ == "__main__":
    _bootstrap.run(main)
