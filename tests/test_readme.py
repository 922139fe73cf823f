"""The README's API example runs as written (keeps the front door true)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_api_example_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    out, h_n = namespace["out"], namespace["h_n"]
    assert type(out).__name__ == "PackedSequence"
    assert tuple(h_n.shape) == (1, 3, 64)
    assert tuple(namespace["h"].shape) == (8, 64)
