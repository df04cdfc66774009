"""``deepgen data``: training data tools. ``deepgen data convert`` turns an official DeepGen 1.0 data list into our
manifest (the formats and their sources: :mod:`deepgen_components.training.convert_data`).

    deepgen data convert --format blip3o data/BLIP3o/blip3o_60k.json --images-root data/BLIP3o --out blip3o.jsonl
    deepgen data convert --format edit data/Nano-150k/data.json --images-root data/Nano-150k \\
        --out nano.jsonl --check-images
    deepgen data convert --format caption data/laion6m/data.json --images-root data/laion6m/raw \\
        --captions-root data/laion6m/captions --out laion6m.jsonl

The manifest is a ``manifest`` source of a training config (``data.sources``); its paths are relative to its own
folder unless ``--absolute``.
"""

from __future__ import annotations

__all__ = ["add_commands"]


def cmd_convert(args) -> int:
    from deepgen_components.training.convert_data import convert_data_list
    from deepgen_components.training.samples import ImageFilter

    report = convert_data_list(
        args.format, args.input, args.images_root, args.out, captions_root=args.captions_root,
        caption_key=args.caption_key, task=args.task, all_inputs=args.all_inputs, check_images=args.check_images,
        filters=ImageFilter(min_side=args.min_side), absolute=args.absolute, overwrite=args.overwrite,
    )
    print(report.summary())
    return 0


def add_commands(sub) -> None:
    from deepgen_components.cli.args import int_at_least

    data = sub.add_parser("data", help="training data tools: convert the official DeepGen data lists to a manifest",
                          description="Training data tools.")
    tools = data.add_subparsers(dest="data_command", metavar="{convert}", required=True)
    p = tools.add_parser(
        "convert", help="an official DeepGen data list (JSON) -> our JSONL manifest",
        description="Convert an official DeepGen 1.0 data list into our JSONL manifest. Formats (the official dataset "
                    "class that reads each): caption (CaptionDataset: {image, annotation} + a caption JSON per "
                    "image; the pre-training T2I sets), blip3o (BLIP3oDataset: {txt, image_path}; the SFT T2I sets), "
                    "edit (ImageEditDataset: {input_image: [...], output_image, instruction}; the editing sets), "
                    "reconstruct (ReconstructDataset: {image}; an edit that keeps the image).",
    )
    p.add_argument("input", metavar="INPUT",
                   help="the data list: a .json file (a JSON list), a folder of them, or a .jsonl file")
    p.add_argument("--format", required=True, help="caption, blip3o, edit or reconstruct")
    p.add_argument("--images-root", required=True, metavar="DIR",
                   help="the folder the list's image paths are relative to (the config's image_folder)")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="the manifest to write")
    p.add_argument("--task", choices=("t2i", "edit"), default=None,
                   help="the task the manifest is for: an error when the format holds the other one")
    p.add_argument("--captions-root", default=None, metavar="DIR",
                   help="--format caption: the folder of the caption files (the config's cap_folder; "
                        "default: --images-root)")
    p.add_argument("--caption-key", default="caption", metavar="KEY",
                   help="--format caption: the caption's key in each caption file (the config's cap_source: "
                        "caption (default), prompt for text-to-image-2M, caption_internlm2_short for megalith-10m)")
    p.add_argument("--all-inputs", action="store_true",
                   help="--format edit: keep every input_image as a reference (the official code uses the first)")
    p.add_argument("--check-images", action="store_true",
                   help="open each image's header: skip an entry whose image is missing, unreadable, or dropped by "
                        "the official filter (shorter side <= --min-side px, aspect outside [0.1, 10])")
    p.add_argument("--min-side", type=int_at_least(0), default=80, metavar="PX",
                   help="--check-images: the filter's shortest side in px (the official 80 at 512 px training; "
                        "the loader uses 80 * image_size / 512 below that; default: 80)")
    p.add_argument("--absolute", action="store_true", help="write absolute image paths (default: relative to OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert)
