"""The Dataflow Flex Template's `metadata.json`, made from the command's own argparse parser.

    python -m pipeline.flex_template > templates/flex/metadata.json     # after changing an option
    python -m pipeline.flex_template --check templates/flex/metadata.json  # exit 1 when out of sync

Every option of `python -m pipeline` (pipeline/options.py `build_parser`) is a template parameter,
with its help text and default; booleans take `true`/`false` (pipeline/argtypes.py), as the Flex
launcher passes every parameter as `--name=value`. `tests/test_flex_template.py` checks the file is
in sync with the parser.

With a Flex Template the Python main runs when the template is *launched* (in the launcher image,
templates/flex/Dockerfile), not when it is built: the default run id (the launch date, UTC), the
`{run_id}` placeholder of `--input`, the shard list and the model check are all resolved at each
launch. The Flex launcher gives the main `--template_location=.../job_object`: the job is built
there (as with --dry_run) and the service submits it; the job then finalises its own run
(pipeline/finalize.py). Outside the Flex launcher (no FLEX_TEMPLATE_ENV in the environment), a
classic template is refused in one line (`pipeline.graph.check_template`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from pipeline.argtypes import BooleanAction

NAME = "gradcam-audit"
DESCRIPTION = (
    "Batched Grad-CAM audit of a Keras image classifier over TFRecord shards: heatmaps, class_stats, "
    "clusters, exemplars and errors tables (Parquet) under <output>/run=<run_id>/, runs.json, a manifest "
    "and report.html, written by the job itself (its last stage). The run id defaults to the launch date "
    "(UTC); {run_id} in --input is replaced by it at launch."
)
SKIPPED = {"help", "help_beam"}  # actions that are not job parameters
_BOOLEAN_REGEX = "^(?i)(true|false|1|0|yes|no|on|off)$"


def _default_text(action: argparse.Action) -> Optional[str]:
    default = action.default
    if default is None or default is argparse.SUPPRESS or default == []:
        return None
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def parameters(parser: Optional[argparse.ArgumentParser] = None) -> list[dict]:
    """One Flex Template parameter per option of the parser (its first long option string)."""
    from pipeline.options import build_parser

    parser = parser or build_parser()
    out = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of its actions
        if action.dest in SKIPPED or not action.option_strings:
            continue
        name = next(s for s in action.option_strings if s.startswith("--"))[2:]
        text = " ".join((action.help or "").replace("%%", "%").split())
        default = _default_text(action)
        if default is not None:
            text += f" (default: {default})"
        param = {"name": name, "label": name.replace("_", " "), "helpText": text, "isOptional": True}
        if isinstance(action, BooleanAction):
            param["regexes"] = [_BOOLEAN_REGEX]
        elif action.choices:
            param["regexes"] = ["^(" + "|".join(map(str, action.choices)) + ")$"]
        out.append(param)
    return out


def metadata() -> dict:
    return {"name": NAME, "description": DESCRIPTION, "streaming": False, "parameters": parameters()}


def render() -> str:
    return json.dumps(metadata(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flex_template", description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="PATH", help="Exit 1 when PATH differs from what this prints")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(args.check, encoding="utf-8") as handle:
            if handle.read() != text:
                sys.stderr.write(f"error: {args.check} is out of sync with the options: "
                                 f"python -m pipeline.flex_template > {args.check}\n")
                return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
