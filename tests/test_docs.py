"""README.md and docs/*.md name only things that exist: config files, make targets, linked files and headings.

- every `configs/....yaml` path (anywhere in the text; `{a,b}` is expanded, `*` must match a file, paths with a
  placeholder such as `<name>` or `$task` are skipped) is a file under the repository root;
- every `make TARGET` inside code (a code span or a fenced block) is a rule of the Makefile;
- every relative markdown link points to an existing file, relative to the page, and its `#anchor`, if any, to a
  heading of the linked page (GitHub's heading ids);
- docs/configs.md names every config under configs/.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG_PATH = re.compile(r"configs/[A-Za-z0-9_./{},*<>$-]+?\.yaml")
PLACEHOLDER = re.compile(r"[<>$]|\.\.\.")
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]+`")
MAKE_CALL = re.compile(r"\bmake\s+([a-z][\w-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
RULE = re.compile(r"^([A-Za-z0-9_.%/-]+(?:[ \t]+[A-Za-z0-9_.%/-]+)*)[ \t]*:(?![=:])", re.M)


def doc_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def make_targets(makefile: Path) -> set[str]:
    """Rule names of a Makefile (special targets such as .PHONY and pattern rules left out)."""
    targets = set()
    for match in RULE.finditer(makefile.read_text()):
        targets.update(t for t in match.group(1).split() if not t.startswith(".") and "%" not in t)
    return targets


def expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [p for option in match.group(1).split(",") for p in expand_braces(head + option + tail)]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def code_of(text: str) -> str:
    return "\n".join(FENCE.findall(text) + CODE_SPAN.findall(FENCE.sub("", text)))


def problems(root: Path) -> list[str]:
    """Every dangling reference in the pages under root, as 'page: what'."""
    found = []
    targets = make_targets(root / "Makefile")
    for page in doc_pages(root):
        text = page.read_text()
        name = page.relative_to(root).as_posix()
        for path in sorted(set(CONFIG_PATH.findall(text))):
            if PLACEHOLDER.search(path):
                continue
            for one in expand_braces(path):
                exists = any(root.glob(one)) if "*" in one else (root / one).is_file()
                if not exists:
                    found.append(f"{name}: no config {one}")
        for target in sorted(set(MAKE_CALL.findall(code_of(text)))):
            if target not in targets:
                found.append(f"{name}: no make target {target!r}")
        for link in LINK.findall(CODE_SPAN.sub("", FENCE.sub("", text))):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
                continue
            file_part, _, anchor = link.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                found.append(f"{name}: broken link {link}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                found.append(f"{name}: no heading #{anchor} in {file_part or name}")
    return found


def test_readme_and_docs_name_only_what_exists():
    assert problems(ROOT) == []


def test_the_checks_catch_a_wrong_config_target_link_and_anchor(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = (ROOT / "README.md").read_text()
    wrong = (
        "\n`configs/position/copee.yaml`, `configs/data/counting_{1,4}var.yaml`, `configs/nowhere/*.yaml`,\n"
        "`make trian`, `make bench-gpu`, [gone](docs/gone.md), [bad anchor](docs/data.md#no-such-heading),\n"
        "[ok](docs/data.md#synthetic-tasks), [web](https://example.com/x.md), [self](#the-two-commands)\n"
    )
    (tmp_path / "README.md").write_text(readme + wrong)
    page = tmp_path / "docs" / "data.md"  # links inside docs/ are relative to docs/
    page.write_text(
        page.read_text()
        + "\n[up](../README.md) [fig](results/none.png) ![ok](results/table2_flipflop_cpu/learning_curves.png)\n"
    )
    assert sorted(problems(tmp_path)) == sorted(
        [
            "README.md: no config configs/position/copee.yaml",
            "README.md: no config configs/data/counting_4var.yaml",
            "README.md: no config configs/nowhere/*.yaml",
            "README.md: no make target 'trian'",
            "README.md: broken link docs/gone.md",
            "README.md: no heading #no-such-heading in docs/data.md",
            "docs/data.md: broken link results/none.png",
        ]
    )


def test_make_targets_are_the_makefiles_rule_names():
    targets = make_targets(ROOT / "Makefile")
    assert {"install", "train", "test", "lint", "clean", "bench", "ablation", "report", "data-wikitext"} <= targets
    assert not {"PYTHON", "VENV", "CONFIG", ".PHONY", "$(STAMP)"} & targets


def test_github_anchors():
    assert github_anchor("Sweeps (`configs/sweeps/`)") == "sweeps-configssweeps"
    assert (
        github_anchor("Copy task, trained at 32 tokens, evaluated at 1x–4x")
        == "copy-task-trained-at-32-tokens-evaluated-at-1x4x"
    )
    assert github_anchor("Fused-kernel registers and spills: `make bench-kernels`") == (
        "fused-kernel-registers-and-spills-make-bench-kernels"
    )


def test_docs_configs_lists_every_config():
    listed = (ROOT / "docs" / "configs.md").read_text()
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert configs and [c for c in configs if f"`{c}`" not in listed] == []
