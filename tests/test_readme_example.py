"""The README's public-API example runs as written (extraction, then the notebook statistics)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs(capsys):
    section = README.read_text().split("## Radiomics and federated statistics", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert len(namespace["features"]) == 14 and "odds_ratio" in namespace["fed"].logistic(["age"]).columns
    frame = namespace["harmonised"].frames["hospital_a"]
    assert frame.equals(namespace["frames"]["hospital_a"])  # the reference site is unchanged
    assert "or_upper" in capsys.readouterr().out
