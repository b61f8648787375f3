"""The README's architecture table is the one tests/parity_table.py generates from the tiny models now."""
import parity_table as pt

def test_readme_table_is_current():
    text = pt.README.read_text()
    assert pt.START in text and pt.END in text
    new = pt.render(text, pt.table())
    assert new == text, "README.md's architecture table is stale: run `python tests/parity_table.py`"

def test_table_lists_every_tested_architecture():
    from headscope.models import TINY_ARCHS, MORE_ARCHS
    body = pt.README.read_text().split(pt.START)[1].split(pt.END)[0]
    assert len(TINY_ARCHS + MORE_ARCHS) >= 30 and f"{len(TINY_ARCHS + MORE_ARCHS)} architectures" in body
    for a in TINY_ARCHS + MORE_ARCHS: assert f"`{a}`" in body or f'tiny_model("{a}")' in body, a
    assert "| NO |" not in body
    from headscope.tiny_encoders import ENCODER_ARCHS, VISION_ARCHS
    assert f"{len(ENCODER_ARCHS + VISION_ARCHS)} encoders" in body
    for a in ENCODER_ARCHS + VISION_ARCHS: assert f"`{a}`" in body, a
