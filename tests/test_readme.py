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


def test_readme_real_code_example_runs(tmp_path, monkeypatch):
    """The second example (convert, half precision, autocast, export, trace) runs as written;
    it writes lstm.pt2 into the working directory, here a temporary one."""
    import warnings

    import torch

    import rnnext

    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2, "README lost its second python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's and TorchScript's deprecation notices
        exec(compile(blocks[1], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model = namespace["model"]
    assert type(model[0]) is rnnext.LSTM
    assert namespace["lstms"] == [model[0]]
    assert namespace["y"].dtype == torch.bfloat16 and namespace["c_n"].dtype == torch.bfloat16
    assert (tmp_path / "lstm.pt2").exists()
    x = torch.randn(3, 7, 16)
    expected = model(x)[0]
    torch.testing.assert_close(namespace["loaded"].module()(x)[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(namespace["traced"](x)[0], expected, rtol=0, atol=1e-6)
