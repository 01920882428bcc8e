"""The Flex Template's main (FLEX_TEMPLATE_PYTHON_PY_FILE in templates/flex/Dockerfile).

The Dataflow Flex launcher runs this file at every launch of the template, with the template's
parameters as `--name=value` and its own Beam options (--runner, --project, --region,
--template_location=<the job file it then submits>, ...). Everything is resolved here, at launch:
the run id (default: the launch date, UTC), `{run_id}` in --input, the shard list, the model check.
Nothing of a run is decided when the image or the template is built.
"""

from pipeline.cli import main

if __name__ == "__main__":
    main()
