"""docs/airflow_dag.py compiles (Airflow itself is not installed here) and uses the operators the docs name."""

import ast
import json
import os

DAG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "airflow_dag.py")
METADATA = os.path.join(os.path.dirname(DAG), "..", "templates", "flex", "metadata.json")


def test_the_dag_file_compiles_and_launches_the_flex_template():
    source = open(DAG, encoding="utf-8").read()
    compile(source, DAG, "exec")
    tree = ast.parse(source)
    calls = {node.func.id: node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert {"DAG", "DataflowStartFlexTemplateOperator", "BashOperator"} <= set(calls)
    # the Flex Template's parameters are the template's (templates/flex/metadata.json)
    flex = calls["DataflowStartFlexTemplateOperator"]
    body = next(k.value for k in flex.keywords if k.arg == "body")
    launch = body.values[0]
    params = next(v for k, v in zip(launch.keys, launch.values, strict=True) if k.value == "parameters")
    names = {k.value for k in params.keys}
    known = {p["name"] for p in json.load(open(METADATA, encoding="utf-8"))["parameters"]}
    assert names <= known, names - known
    assert "pipeline" in ast.literal_eval(next(k.value for k in calls["BashOperator"].keywords
                                                if k.arg == "bash_command"))
