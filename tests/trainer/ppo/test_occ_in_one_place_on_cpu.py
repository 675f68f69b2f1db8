"""OCC lives in one module: one function takes the ratio that is lambda, and no value comes back from a metric name.

Read from the product's source (ast), so a second copy of the formula or a metric parsed back into a number fails
here before it can drift from the first: every division by ``(... + eps)`` in ``verl_mtp`` is inside
``calibrated_lambda``, which the proxy, the gradient estimator and the diagnostics all call; the OCC sums'
metric names exist only as ``HeadMetric`` constants, and nothing in the product looks a value up by them.
"""

import ast
from pathlib import Path

PRODUCT = Path(__file__).resolve().parents[3] / "verl_mtp"
SUM_METRICS = {"CROSS_SUM", "DMTP_SQ_SUM"}


def modules():
    for path in sorted(PRODUCT.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def enclosing_functions(tree):
    """``{id(node): name of the innermost function around it}``."""
    owner = {}

    def visit(node, name):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            owner[id(child)] = inner
            visit(child, inner)

    visit(tree, None)
    return owner


def mentions_eps(node) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "eps" or isinstance(n, ast.Attribute) and n.attr == "eps"
               for n in ast.walk(node))


def test_lambda_is_divided_out_in_one_function():
    found = []
    for path, tree in modules():
        owner = enclosing_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and mentions_eps(node.right):
                found.append((path.name, owner.get(id(node))))
    assert found == [("mtp_occ.py", "calibrated_lambda")], found


def names_a_sum(node) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in SUM_METRICS for n in ast.walk(node))


def test_no_value_is_looked_up_by_a_sums_metric_name():
    for path, tree in modules():
        source = path.read_text()
        if path.name != "mtp_occ.py":
            assert "occ_cross_sum" not in source and "occ_dmtp_sq_sum" not in source, path
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                assert not names_a_sum(node.slice), f"{path}:{node.lineno} reads a value by a sums metric name"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("get", "pop"):
                assert not any(names_a_sum(a) for a in node.args), f"{path}:{node.lineno}"


def test_every_estimator_calls_the_one_function():
    callers = set()
    for path, tree in modules():
        owner = enclosing_functions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "calibrated_lambda":
                callers.add((path.name, owner.get(id(node))))
    assert {("mtp_occ.py", "resolve"), ("mtp_occ_gradient.py", "lambdas"), ("losses.py", "_head_term")} <= callers
