"""The README's code snippets are files under python/snippets/, shown verbatim, and they run.

1. Every ```python block of README.md equals (modulo trailing whitespace) one file of
   python/snippets/, and every such file is shown in the README: the two cannot drift apart.
2. Every snippet file runs as written, in a fresh interpreter, from a temporary directory, against
   the sgg_kernels package this test process imported (helpers.run_python), and prints its line of
   output shapes.
"""
import re

import pytest

from helpers import ROOT, run_python

README = ROOT / "README.md"
SNIPPETS = ROOT / "python" / "snippets"

# The last line each snippet prints (the shapes of its outputs).
EXPECTED = {
    "sil_clustering.py": "pooled [8, 49, 64] assign [8, 6144] y [8, 6144, 64] fmap.grad [2, 256, 64, 96]",
    "linknet_head.py": "obj_logits [10, 151] rel_logits [42, 51] losses ['loss_gce', 'loss_obj_cls', 'loss_rel_cls']",
    "seg_grounded_masks.py": "masks [10, 150, 28, 28] z_hat [10, 256, 28, 28] m_pair [42, 150, 14, 14] "
                             "z_hat_pair [42, 256, 14, 14]",
    "sgb_drop_in.py": "union_feats [42, 512] rel_dists [42, 51] per image [[30, 51], [12, 51]]",
    "sil_rde.py": "sil_map [2, 256, 16, 24] rel_feats [42, 512] losses ['info', 'pred_rde', 'proto', 'proto_sep', "
                  "'re', 'total']",
}

SNIPPET_FILES = sorted(p.name for p in SNIPPETS.glob("*.py"))


def _normalise(text: str) -> str:
    """Trailing whitespace of every line and trailing blank lines do not count."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _python_blocks(markdown: str):
    """(line number, code) of every fenced ```python block."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", markdown, flags=re.M | re.S):
        blocks.append((markdown.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def test_snippet_files_exist():
    assert SNIPPET_FILES, f"no snippet files under {SNIPPETS}"
    assert set(SNIPPET_FILES) == set(EXPECTED), (
        f"python/snippets/ holds {SNIPPET_FILES}, the expected output lines are for {sorted(EXPECTED)}")


def test_readme_python_blocks_are_snippet_files():
    files = {name: _normalise((SNIPPETS / name).read_text()) for name in SNIPPET_FILES}
    blocks = _python_blocks(README.read_text())
    assert blocks, "README.md has no ```python blocks"
    shown = []
    for line, code in blocks:
        matches = [name for name, text in files.items() if text == _normalise(code)]
        assert matches, (f"the ```python block at README.md line {line} is not, verbatim, any file of "
                         f"python/snippets/ ({SNIPPET_FILES}): copy the file into the README (or the block into a file)")
        shown += matches
    missing = sorted(set(files) - set(shown))
    assert not missing, f"python/snippets/ files not shown in README.md: {missing}"
    assert len(shown) == len(set(shown)), f"a snippet is shown twice in README.md: {sorted(shown)}"


@pytest.mark.parametrize("name", SNIPPET_FILES)
def test_snippet_runs(name):
    proc = run_python([SNIPPETS / name], timeout=300)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing; stderr:\n{proc.stderr}"
    assert lines[-1].strip() == EXPECTED[name]
