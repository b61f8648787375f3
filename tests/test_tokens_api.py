"""The TransformerLens-style helpers: token helpers (`to_tokens`, `to_str_tokens`, `to_string`, `to_single_token`,
`get_token_position`), `test_prompt` and `generate`. Edge cases the notebooks do not carry: empty and whitespace text,
every input shape, batches, and bad input refused before any forward."""
import re
from contextlib import contextmanager
from html.parser import HTMLParser
import numpy as np
import pytest, torch
from headscope.models import tiny_model
from headscope.tokens import (to_tokens, to_str_tokens, to_string, to_single_token, get_token_position, to_inputs,
                              set_prepend_bos)
from headscope.causal.lens import test_prompt   # a library function marked `__test__ = False`: pytest must not collect it
from headscope.interventions import generate, ablate
from _checks import assert_no_hooks

@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    return tiny_model("llama", n_layers=2)

@contextmanager
def forwards(model):
    "Count the model's forward passes inside the block"
    n = [0]
    h = model.register_forward_pre_hook(lambda mod, args: n.__setitem__(0, n[0] + 1))
    try: yield n
    finally: h.remove()

def raw(m, s, special=True): return m.tokenizer(s, add_special_tokens=special)["input_ids"]

# --- to_tokens ---------------------------------------------------------------------------------

def test_to_tokens_is_what_the_model_is_fed(m):
    t = to_tokens(m, "a cat")
    assert t.dtype == torch.long and t.shape == (1, len(raw(m, "a cat"))) and t.device == m.device
    assert t[0].tolist() == raw(m, "a cat")
    for side in ("left", "right"):
        b = to_tokens(m, ["a cat", "hi"], padding_side=side)
        assert torch.equal(b, to_inputs(m, ["a cat", "hi"], padding_side=side)["input_ids"])
    assert to_tokens(m, ["hi"]).shape == (1, 3)                               # a list of one: still [batch pos]

def test_to_tokens_empty_and_whitespace(m):
    assert to_tokens(m, "").tolist() == [raw(m, "")]                          # the byte tokenizer's BOS alone
    e = to_tokens(m, "", prepend_bos=False)
    assert e.shape == (1, 0) and e.dtype == torch.long                         # no BOS, no text: no tokens (not floats)
    assert to_str_tokens(m, "", prepend_bos=False) == []
    assert to_str_tokens(m, " \n\t") == [m.tokenizer.decode([i]) for i in raw(m, " \n\t")]
    b = to_tokens(m, ["", "ab"], prepend_bos=False, padding_side="left")
    assert b.tolist() == [[m.tokenizer.pad_token_id] * 2, raw(m, "ab", False)]
    with pytest.raises(ValueError, match="no tokens"): to_inputs(m, e)          # the model refuses it, clearly

def test_to_tokens_follows_the_model_default(m):
    try:
        set_prepend_bos(m, False)
        assert to_tokens(m, "ab")[0].tolist() == raw(m, "ab", False)
        assert to_tokens(m, "ab", prepend_bos=True)[0].tolist() == raw(m, "ab")
    finally: set_prepend_bos(m, None)

@pytest.mark.parametrize("bad, err, msg", [(torch.tensor([1, 2]), TypeError, "a prompt or a list of prompts"),
                                           ([], ValueError, "no prompts"), (["a", 3], TypeError, "list of prompts")])
def test_to_tokens_refuses_non_text(m, bad, err, msg):
    with pytest.raises(err, match=msg): to_tokens(m, bad)

def test_padding_side_is_checked(m):
    with pytest.raises(ValueError, match="'left', 'right' or None"): to_tokens(m, ["a", "bc"], padding_side="middle")
    with pytest.raises(ValueError, match="'left', 'right' or None"): to_inputs(m, ["a", "bc"], padding_side="up")

# --- to_str_tokens / to_string ---------------------------------------------------------------

def test_to_str_tokens_every_shape_agrees(m):
    ids = raw(m, "a cat")
    want = [m.tokenizer.decode([i]) for i in ids]
    for x in ("a cat", ids, tuple(ids), torch.tensor(ids), torch.tensor([ids]), np.array(ids), np.array([ids])):
        assert to_str_tokens(m, x) == want, type(x)
    assert to_str_tokens(m, torch.tensor(ids[1])) == [want[1]]                  # one id
    assert to_str_tokens(m, []) == []

def test_to_str_tokens_batches(m):
    b = to_tokens(m, ["a cat", "hi"], padding_side="right")
    rows = to_str_tokens(m, b)
    assert len(rows) == 2 and rows[0] == to_str_tokens(m, "a cat") and rows[1][:3] == to_str_tokens(m, "hi")
    assert rows[1][3:] == [m.tokenizer.pad_token] * 3                          # padding is shown, as the ids hold it
    assert to_str_tokens(m, [raw(m, "a cat"), raw(m, "hi")]) == [to_str_tokens(m, "a cat"), to_str_tokens(m, "hi")]   # ragged rows
    assert to_str_tokens(m, ["a cat", "hi"]) == [to_str_tokens(m, "a cat"), to_str_tokens(m, "hi")]

def test_to_string_shapes(m):
    ids = raw(m, "a cat")
    assert to_string(m, ids) == m.tokenizer.decode(ids) == "<bos>a cat"       # special tokens kept
    assert to_string(m, torch.tensor(ids)) == to_string(m, np.array(ids)) == to_string(m, ids)
    assert to_string(m, torch.tensor([ids])) == ["<bos>a cat"]                # 2-D: a list, even for one row
    assert to_string(m, ids[1]) == "a" and to_string(m, []) == ""
    assert to_string(m, [ids, raw(m, "hi")]) == ["<bos>a cat", "<bos>hi"]

@pytest.mark.parametrize("fn", [to_str_tokens, to_string])
def test_bad_ids_are_refused(m, fn):
    with pytest.raises(TypeError, match="must be integers"): fn(m, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="outside the vocabulary"): fn(m, [1, 10**6])
    with pytest.raises(ValueError, match="outside the vocabulary"): fn(m, [-1])
    with pytest.raises(ValueError, match=r"\[batch pos\]"): fn(m, torch.zeros(1, 1, 2, dtype=torch.long))

def test_other_inputs_are_refused_clearly(m):
    x = to_inputs(m, ["a", "bc"])
    for fn in (to_str_tokens, to_string):
        with pytest.raises(TypeError, match="takes text or token ids"): fn(m, x)            # a dict: pass x["input_ids"]
        with pytest.raises(TypeError, match="takes text or token ids"): fn(m, [1, "a"])

def test_to_string_refuses_text(m):
    with pytest.raises(TypeError, match="already text"): to_string(m, "a cat")

def test_no_tokenizer_is_a_clear_error():
    t = tiny_model("gpt2", n_layers=1); t.tokenizer = None
    for f in (lambda: to_tokens(t, "a"), lambda: to_str_tokens(t, [1, 2]), lambda: to_string(t, [1]),
              lambda: to_single_token(t, "a"), lambda: get_token_position(t, "a", "a b")):
        with pytest.raises(ValueError, match="needs a tokenizer"): f()

# --- to_single_token / get_token_position -----------------------------------------------------

def test_to_single_token(m):
    assert to_single_token(m, "x") == raw(m, "x", False)[0]
    assert to_single_token(m, 7) == 7                                         # an id passes through
    with pytest.raises(ValueError, match=r"'xy' is 2 tokens \['x', 'y'\]"): to_single_token(m, "xy")
    with pytest.raises(ValueError, match="is 0 tokens"): to_single_token(m, "")
    with pytest.raises(TypeError, match="string or an integer"): to_single_token(m, True)

def test_get_token_position(m):
    ids = raw(m, "abcab")                                                     # <bos> a b c a b
    a = raw(m, "a", False)[0]
    assert get_token_position(m, "a", "abcab") == ids.index(a) == 1
    assert get_token_position(m, "a", "abcab", mode="last") == 4
    assert get_token_position(m, "a", "abcab", prepend_bos=False) == 0
    for x in (ids, torch.tensor(ids), torch.tensor([ids]), np.array(ids)):
        assert get_token_position(m, a, x, mode="last") == 4
    with pytest.raises(ValueError, match="one sequence"): get_token_position(m, "a", to_tokens(m, ["ab", "ba"]))
    with pytest.raises(ValueError, match=r"not in the input, whose tokens are \['<bos>', 'a', 'b'\]"): get_token_position(m, "z", "ab")
    with pytest.raises(ValueError, match="'first' or 'last'"): get_token_position(m, "a", "ab", mode=1)
    with pytest.raises(TypeError, match="one prompt or its token ids"): get_token_position(m, "a", 3.5)
    with pytest.raises(ValueError, match="2 tokens"): get_token_position(m, "ab", "ab")

# --- test_prompt -------------------------------------------------------------------------------

def test_test_prompt_is_not_collected():
    assert test_prompt.__test__ is False

def test_test_prompt_matches_a_plain_forward(m):
    r = test_prompt(m, "the cat", "sat", top_k=5, print_details=False)          # " sat": 4 byte tokens, teacher-forced
    ids = raw(m, "the cat") + raw(m, " sat", False)
    with torch.no_grad(): lg = m(torch.tensor([ids])).logits[0].double()
    n = len(raw(m, "the cat"))
    assert r.answer_tokens == [" ", "s", "a", "t"] and r.answer_ids.tolist() == ids[n:]
    for i, t in enumerate(ids[n:]):
        row = lg[n - 1 + i]
        assert int(r.ranks[i]) == row.argsort(descending=True).tolist().index(t)
        assert abs(float(r.logits[i]) - float(row[t])) < 1e-4
        assert abs(float(r.probs[i]) - float(row.softmax(-1)[t])) < 1e-5
        assert r.top.ids[i].tolist() == row.topk(5).indices.tolist()
    assert "Ranks of the answer tokens" in repr(r) and "hs-prompt-test" in r._repr_html_()

class _Unstyled(HTMLParser):
    "Elements whose style lacks an explicit text colour or background (dark themes restyle table, tr, q, ... directly)"
    def __init__(self): super().__init__(); self.bad = []
    def handle_starttag(self, tag, attrs):
        st = dict(attrs).get("style") or ""
        if tag != "br" and not (re.search(r"(^|;)\s*color\s*:", st) and "background" in st): self.bad.append(f"<{tag} style='{st}'>")

def test_test_prompt_html_escapes_and_brings_its_colours(m):
    h = test_prompt(m, "<script>x</script>", "<b>&", top_k=3, print_details=False)._repr_html_()
    assert "<script>" not in h and "<b>" not in h
    assert "&lt;script&gt;x&lt;/script&gt;" in h and "&amp;" in h           # the prompt text (top-k header) and the '&' token, escaped
    p = _Unstyled(); p.feed(h)
    assert p.bad == []

def test_test_prompt_prints_only_when_asked(m, capsys):
    r = test_prompt(m, "ab", "c", top_k=2)
    assert capsys.readouterr().out == repr(r) + "\n"
    test_prompt(m, "ab", "c", print_details=False)
    assert capsys.readouterr().out == ""

@pytest.mark.parametrize("kw, err, msg", [(dict(answer=""), ValueError, "answer is empty"),
                                          (dict(answer=["a"]), TypeError, "answer must be a string"),
                                          (dict(prompt=None), TypeError, "prompt must be a string"),
                                          (dict(top_k=0), ValueError, "top_k=0"),
                                          (dict(top_k=10**6), ValueError, "top_k="),
                                          (dict(prompt="", prepend_bos=False), ValueError, "has no tokens")])
def test_test_prompt_refuses_bad_input_before_any_forward(m, kw, err, msg):
    args = dict(prompt="ab", answer="c", print_details=False) | kw
    with forwards(m) as n, pytest.raises(err, match=msg): test_prompt(m, **args)
    assert n[0] == 0

def test_test_prompt_too_long_for_learned_positions():
    g = tiny_model("gpt2", n_layers=1)
    with forwards(g) as n, pytest.raises(ValueError, match="learned positions"):
        test_prompt(g, "a" * (g.config.n_positions - 2), "bcd", print_details=False)
    assert n[0] == 0

# --- generate ----------------------------------------------------------------------------------

def test_generate_returns_text_per_prompt(m):
    one = generate(m, "hi", max_new_tokens=4)
    assert isinstance(one, str)
    both = generate(m, ["hi", "the cat"], max_new_tokens=4)
    assert isinstance(both, list) and len(both) == 2 and both[0] == one
    assert generate(m, ("hi",), max_new_tokens=4) == [one]
    assert generate(m, "hi", max_new_tokens=4, return_full=True) == "hi" + one

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_batch_equals_each_prompt(arch):
    t = tiny_model(arch, n_layers=2)
    ps = ["the cat sat", "hi", "a longer prompt here"]
    hk = [("blocks.1.hook_mlp_out", ablate(pos=-1))]
    batch = generate(t, ps, max_new_tokens=5, hooks=hk, min_new_tokens=5)
    assert batch == [generate(t, p, max_new_tokens=5, hooks=hk, min_new_tokens=5) for p in ps]
    assert_no_hooks(t)

def test_generate_hooks_see_every_step(m):
    seen = []
    generate(m, "hi", max_new_tokens=5, hooks=[("blocks.0.hook_resid_post", lambda a, h: seen.append(a.shape[1]))], min_new_tokens=5)
    assert seen == [3, 1, 1, 1, 1]                                             # prefill, then one token per cached step
    assert_no_hooks(m)

def test_generate_hooks_removed_after_an_error(m):
    def boom(a, h):
        if a.shape[1] == 1: raise RuntimeError("boom in a cached step")
    with pytest.raises(RuntimeError, match="boom in a cached step"):
        generate(m, ["hi", "the cat"], max_new_tokens=4, hooks=[("blocks.1.attn.hook_z", boom)])
    assert_no_hooks(m)
    assert generate(m, "hi", max_new_tokens=3) == generate(m, "hi", max_new_tokens=3)   # and the model works as before

@pytest.mark.parametrize("kw, err, msg", [(dict(prompt=""), ValueError, "empty"),
                                          (dict(prompt=[]), TypeError, "non-empty list"),
                                          (dict(prompt=torch.tensor([[1, 2]])), TypeError, "non-empty list"),
                                          (dict(max_new_tokens=0), ValueError, "positive int"),
                                          (dict(max_new_tokens=2.5), ValueError, "positive int"),
                                          (dict(hooks=[("blocks.7.hook_resid_post", ablate())]), Exception, "blocks.7"),
                                          (dict(hooks=[("blocks.0.hook_resid_post", 3)]), TypeError, "not callable")])
def test_generate_refuses_bad_input_before_any_forward(m, kw, err, msg):
    args = dict(prompt="hi") | kw
    with forwards(m) as n, pytest.raises(err, match=msg): generate(m, **args)
    assert n[0] == 0
    assert_no_hooks(m)

def test_generate_beyond_learned_positions_is_refused_before_any_forward():
    g = tiny_model("gpt2", n_layers=1)
    long = "a" * (g.config.n_positions - 5)                                      # with BOS: 4 positions left
    with forwards(g) as n, pytest.raises(ValueError, match="ask for at most 4 new tokens"):
        generate(g, [long, "x"], max_new_tokens=5)                                  # the longest row decides
    assert n[0] == 0
    assert isinstance(generate(g, long, max_new_tokens=4, min_new_tokens=4), str)   # right at the limit: runs (wpe has the rows)
