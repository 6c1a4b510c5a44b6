"""Fast start: the package and the CLI's help import nothing heavy; a full checkpoint loads without peft, onto
the requested device and dtype. Each check runs in a fresh interpreter, where `sys.modules` tells the truth."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "diffusers", "ray", "accelerate")


def imported_after(code: str) -> dict:
    """Runs `code` in a new interpreter; returns which of HEAVY it imported (and what the code printed)."""
    report = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", report], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import artquant",
        "import artquant; artquant.__version__",
        "from artquant.cli import main\ntry:\n    main(['score', '--help'])\nexcept SystemExit:\n    pass",
        "from artquant.cli import main\ntry:\n    main(['describe', '--help'])\nexcept SystemExit:\n    pass",
        "from artquant.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
    ids=["import", "version", "score --help", "describe --help", "--help"],
)
def test_starting_imports_nothing_heavy(code):
    assert imported_after(code) == []


def test_report_command_imports_nothing_heavy(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("path,score,std,error\n/nowhere/a.png,5.0,1.0,\n")
    code = f"from artquant.cli import main\nassert main(['report', {str(scores)!r}, '--out', {str(tmp_path / 'r')!r}]) == 0"
    assert imported_after(code) == []
    assert (tmp_path / "r" / "index.html").is_file()


def test_full_checkpoint_loads_without_peft_onto_the_device_in_its_dtype(reference_dir):
    code = (
        "from artquant import ArtQuantScorer\n"
        f"scorer = ArtQuantScorer.from_pretrained({str(reference_dir / 'mplug_owl2_base')!r}, device='cpu', dtype='bf16')\n"
        "tensors = [*scorer.model.parameters(), *scorer.model.buffers()]\n"
        "assert {t.device.type for t in tensors} == {'cpu'}, 'nothing left on the meta device'\n"
        "assert {p.dtype for p in scorer.model.parameters()} == {__import__('torch').bfloat16}\n"
        "assert scorer.score(" + repr(str(next((reference_dir / "images").iterdir()))) + ")[0].ok\n"
    )
    imported = imported_after(code)
    assert "peft" not in imported and "diffusers" not in imported and "ray" not in imported
    assert "transformers" in imported, "the check must have loaded a model"
