"""The repository's own docs carry what its code relies on: every Markdown file a source file or
doc names is in the repository, and every `docs/METHOD.md §N` it points to is a section there."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a Markdown path in prose; not one in a string literal (a file the code writes, "results.md")
NAMED = re.compile(r"(?<![\w/.'\"-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
SECTION = re.compile(r"docs/METHOD\.md §(\d+)")


def tracked(suffixes=(".py", ".md", ".yaml", ".cfg", ".toml")) -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.split() if f.endswith(suffixes)]


def dangling(files: list[Path], root: Path = ROOT) -> list[str]:
    names = {p.name for p in root.rglob("*.md") if ".git" not in p.parts}
    method = root / "docs" / "METHOD.md"
    sections = (
        set(re.findall(r"^## §(\d+)", method.read_text(), re.M)) if method.is_file() else set()
    )
    bad = []
    for f in files:
        text = f.read_text(errors="replace")
        for name in NAMED.findall(text):
            if "/" in name and not name.startswith("../"):
                ok = (root / name).is_file() or (f.parent / name).is_file()
            else:
                ok = not name.startswith("../") and Path(name).name in names
            if not ok:
                bad.append(f"{f.relative_to(root)}: {name}")
        bad += [f"{f.relative_to(root)}: §{n}" for n in SECTION.findall(text) if n not in sections]
    return bad


def test_every_named_doc_is_in_the_repository():
    files = [f for f in tracked() if f != Path(__file__).resolve()]  # this file names bad ones
    assert dangling(files) == []


def test_the_check_sees_a_missing_doc_and_section(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "METHOD.md").write_text("# m\n\n## §1 Data\n")
    good = tmp_path / "good.py"
    good.write_text('"""See docs/METHOD.md §1 and METHOD.md."""\n')
    bad = tmp_path / "bad.py"
    bad.write_text('"""Facts in REFERENCE.md, ../shared/DESIGN.md and docs/METHOD.md §7."""\n')
    assert dangling([good, bad], tmp_path) == [
        "bad.py: REFERENCE.md",
        "bad.py: ../shared/DESIGN.md",
        "bad.py: §7",
    ]
