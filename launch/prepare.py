"""Prepare data: `synth` (synthetic corpus), `mine` (triplets from a caption table),
`filter` (metadata filter of an annotation CSV).

  python launch/prepare.py synth --out DIR [--videos N] [--seed S]
  python launch/prepare.py mine --captions CAPTIONS.csv --out DIR
  python launch/prepare.py filter --annotations A.csv --metadata M.jsonl --out KEPT.csv
Settings not on the command line come from --config (YAML) and key=value overrides.
"""

import argparse
import json

import _bootstrap


def parser() -> argparse.ArgumentParser:
    parser, sub = _bootstrap.command_parser(__doc__)
    p = sub.add_parser("synth", help="generate the synthetic corpus and mine its splits")
    p.add_argument("--out", required=True)
    p.add_argument("--videos", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = sub.add_parser("mine", help="mine train/val/test triplets from a caption table")
    p.add_argument("--captions", required=True, help="WebVid-style caption CSV")
    p.add_argument("--out", required=True)
    p.add_argument("--edit-model", help="local transformers text-generation model for edits")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = sub.add_parser("filter", help="keep triplets whose videos share author or category")
    p.add_argument("--annotations", required=True)
    p.add_argument("--metadata", required=True, help="JSON lines: videoid, author, categories")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from configs import load_config

    overrides = list(args.overrides)
    if args.command == "synth":
        if args.videos is not None:
            overrides.append(f"data.synth.videos={args.videos}")
        if args.seed is not None:
            overrides += [f"data.synth.seed={args.seed}", f"data.mining.seed={args.seed}"]
    cfg = load_config(args.config, overrides)  # every setting checked before anything runs
    _bootstrap.setup_logging()

    from data import corpus

    if args.command == "synth":
        summary = corpus.build_synthetic(args.out, cfg.data.synth, cfg.data.mining, progress=True)
    elif args.command == "mine":
        edit_fn = corpus.mining.template_edit
        if args.edit_model:
            edit_fn = corpus.mining.transformers_edit_fn(args.edit_model)
        summary = corpus.mine_to_csv(
            args.captions, args.out, cfg.data.mining, edit_fn, progress=True
        )
    else:
        from data.captions import read_metadata
        from data.filtering import filter_triplets
        from data.webvid_covr import read_annotations, write_annotations

        rows = read_annotations(args.annotations)
        kept, report = filter_triplets(
            rows,
            read_metadata(args.metadata),
            cfg.data.filter.by_author,
            cfg.data.filter.by_category,
        )
        write_annotations(args.out, kept)
        print("\n".join(report.lines()))
        summary = vars(report)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    _bootstrap.run(main, also=(ValueError,))  # data/ reports malformed input tables so
