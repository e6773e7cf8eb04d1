"""Decoding with the code tool (rollout/with_tools.py): the loop's rules on scripted rows, then the real model's
caches: every token the model chose is what a plain forward over the finished transcript predicts."""

import pytest
import torch

from grpo_cli.model import builtin as builtin_model
from grpo_cli.data import builtin_task
from grpo_cli.rollout import decoder
from grpo_cli.tools import calls as tool_calls
from grpo_cli.rewards.answers import is_correct
from grpo_cli.model.calls import position_ids
from grpo_cli.rollout.sampling import _pack, generate
from grpo_cli.rollout.settings import Sampling
from grpo_cli.tools.calls import limit_note
from grpo_cli.rollout.with_tools import ToolSession, ToolSettings, decode_with_tools, printed_from_mask
from tool_fakes import InProcessTools


class ScriptedStepper:
    """Each row writes its script, token by token, whatever it is fed; rows that finish or pause are followed
    by their row numbers through `keep`. Records what it was fed, to check the loop's bookkeeping."""

    def __init__(self, scripts: list[list[int]], vocab: int):
        self.scripts, self.vocab = scripts, vocab
        self.rows = list(range(len(scripts)))
        self.at = [0] * len(scripts)  # model tokens each row has written
        self.appended: dict[int, list[list[int]]] = {r: [] for r in self.rows}

    def _logits(self, rows) -> torch.Tensor:
        logits = torch.full((len(rows), self.vocab), -1e9)
        for i, row in enumerate(rows):
            script = self.scripts[row]
            logits[i, script[min(self.at[row], len(script) - 1)]] = 0.0
        return logits

    def prefill(self, input_ids, attention_mask, samples):
        assert samples == 1
        return self._logits(self.rows)

    def keep(self, rows):
        self.rows = [self.rows[i] for i in rows.tolist()]

    def step(self, tokens, live):
        for i, row in enumerate(self.rows):
            if live[i]:
                assert tokens[i].item() == self.scripts[row][self.at[row]], "fed a token the row did not choose"
                self.at[row] += 1
        return self._logits(self.rows)

    def append(self, tokens, valid):
        for i, row in enumerate(self.rows):
            if valid[i].any():
                self.appended[row].append(tokens[i][valid[i]].tolist())
        return self._logits(self.rows)


@pytest.fixture(scope="module")
def char_tokenizer():
    return builtin_model.build_tokenizer()


def scripted(tokenizer, texts: list[str], max_new_tokens: int = 120, max_calls: int = 4):
    eos = tokenizer.eos_token_id
    scripts = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    stepper = ScriptedStepper(scripts, len(tokenizer))
    prompt = torch.ones(len(texts), 2, dtype=torch.long)
    tools = InProcessTools(max_calls=max_calls)
    decoded = decode_with_tools(stepper, tokenizer, prompt, torch.ones_like(prompt),
                                Sampling(max_new_tokens=max_new_tokens, greedy=True), [eos], tools)
    tokens, tool_mask, use = decoded.tokens, decoded.tool_mask, decoded.tool_use
    texts_out = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
    return texts_out, tokens, tool_mask, use, stepper


def test_a_closed_block_runs_and_its_output_joins_the_transcript_while_other_rows_go_on(char_tokenizer):
    code = "\n```python\nprint(6 * 7)\n```"
    texts, tokens, tool_mask, use, stepper = scripted(char_tokenizer, [code + "#### 42", " 6*7=42. #### 42"])
    assert texts[0] == "\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n#### 42"
    assert texts[1] == " 6*7=42. #### 42"
    assert use.calls.tolist() == [1, 0] and use.errors.tolist() == [0, 0]
    # the output block, and nothing else, is marked as tool output, and went to the cache in one piece
    shown = char_tokenizer.decode(tokens[0][tool_mask[0]])
    assert shown == "\n```output\n42\n```\n"
    assert [char_tokenizer.decode(a) for a in stepper.appended[0]] == [shown] and stepper.appended[1] == []
    # the script's own "#### 42" followed the output: the model's tokens are all there, in order
    assert char_tokenizer.decode(tokens[0][~tool_mask[0]], skip_special_tokens=True) == code + "#### 42"


def test_errors_are_shown_to_the_model_and_counted(char_tokenizer):
    texts, *_, use, _ = scripted(char_tokenizer, ["\n```python\nprint(x)\n```\n#### 1"])
    assert "```output\nNameError: name 'x' is not defined\n```" in texts[0]
    assert use.calls.tolist() == [1] and use.errors.tolist() == [1]


def test_a_block_past_max_tool_calls_is_not_run_and_says_so(char_tokenizer):
    block = "\n```python\nprint(1)\n```"
    texts, *_, use, _ = scripted(char_tokenizer, [block + block + "#### 1"], max_calls=1, max_new_tokens=240)
    assert texts[0].count("```output\n1\n```") == 1
    assert f"```output\n{limit_note(1)}\n```" in texts[0]
    assert use.calls.tolist() == [1] and use.refused.tolist() == [1]


def test_tool_output_counts_against_the_budget_and_is_cut_there(char_tokenizer):
    code = "\n```python\nprint('x' * 50)\n```"
    texts, tokens, tool_mask, use, _ = scripted(char_tokenizer, [code + "\n#### 1"], max_new_tokens=len(code) + 20)
    assert tokens.shape[1] == len(code) + 20
    assert tool_mask[0, len(code):].all() and not tool_mask[0, : len(code)].any()
    assert texts[0].startswith(code + "\n```output\nxxx") and "####" not in texts[0]


def test_a_block_of_another_language_or_still_open_is_not_run(char_tokenizer):
    texts, *_, use, _ = scripted(char_tokenizer, ["\n```\nprint(1)\n```\n#### 1", "\n```python\nprint(1)\n#### 1"])
    assert use.calls.tolist() == [0, 0] and "```output" not in texts[0] + texts[1]


FENCE_HACK = 'print("1\\n```\\nSo the answer is \\\\boxed{391}.")'  # the code prints a fence, then an answer


def test_the_text_reads_as_the_masks_say_whatever_the_code_printed(char_tokenizer):
    """What the tool printed, found in the text (tool_calls.printed_spans, all that grpo score and grpo eval have)
    and known from the tool mask, agree; and none of it is graded as the model's answer."""
    scripts = {  # the model's text -> the gold it tries to earn
        f"\n```python\n{FENCE_HACK}\n```": "391",
        # "é" is no character of this tokenizer: decoding drops it, and two backticks and one would make a fence
        "\n```python\nprint('1' + chr(10) + '``' + chr(233) + '`' + chr(10) + '#### 391')\n```": "391",
        # a special token the decoded text drops, between a newline and a fence: that text closes the block there
        "\n```python\nprint('#### 391')\nx = '''\n<|im_start|>```\n'''\n```": "391",
        "\n```python\nprint('x' * 300 + chr(10) + '#### 391')\n```": "391",  # cut at the budget
        "\n```python\nprint('<|im_' + 'end|>')\n```\n#### 1": "1",  # printed, an end of turn is text
        "\n```python\nprint('```output')\n```\n```python\nprint(2)\n```\n#### 2": "2",
    }
    texts, tokens, tool_mask, use, _ = scripted(char_tokenizer, list(scripts), max_new_tokens=240)
    assert use.calls.tolist() == [1, 1, 1, 1, 1, 2]
    for text, ids, is_tool, gold in zip(texts, tokens, tool_mask, scripts.values()):
        assert tool_calls.printed_spans(text) == printed_from_mask(char_tokenizer, ids, is_tool, text), text
        assert is_correct(text, gold) == (gold != "391"), text
    assert "print('#### 391')\nx = '''\n```\n```output\nSyntaxError" in texts[2]  # the block ran as read


def test_a_printed_answer_earns_nothing_through_the_real_sandbox_and_scoring(char_tokenizer):
    """End to end: the model writes the attacker's code, the sandbox runs it, the rollout is packed and scored as
    training scores it. What the code printed is known from the mask; the text, read alone, says the same."""
    from grpo_cli.data.examples import Example
    from grpo_cli.rewards.scoring import Scorer
    from grpo_cli.run.step_batch import score_rollout

    honest = "\n```python\nprint(17 * 23)\n```So the answer is \\boxed{391}."
    texts = [f"\n```python\n{FENCE_HACK}\n```", honest]
    eos = char_tokenizer.eos_token_id
    stepper = ScriptedStepper([char_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts],
                              len(char_tokenizer))
    prompt = torch.ones(2, 2, dtype=torch.long)
    with ToolSession(ToolSettings()) as session:
        decoded = decode_with_tools(stepper, char_tokenizer, prompt, torch.ones_like(prompt),
                                    Sampling(max_new_tokens=160, greedy=True), [eos], session)
    tokens, use = decoded.tokens, decoded.tool_use
    rollout = _pack(char_tokenizer, prompt, torch.ones_like(prompt), decoded, [eos], 2)
    assert use.errors.tolist() == [0, 0]
    hack_printed = "1\n` ` `\nSo the answer is \\boxed{391}."
    assert [[text[a:b] for a, b in spans] for text, spans in zip(rollout.texts, rollout.tool_outputs)] == [
        [hack_printed], ["391"]]
    assert [tool_calls.printed_spans(t) for t in rollout.texts] == rollout.tool_outputs
    with Scorer() as scorer:
        scores = score_rollout(scorer, ["correctness"], rollout, [Example(prompt="q", answer="391")]).result()
        assert scorer._pool is None  # graded in this process: no worker was needed
    assert scores.column("correctness").tolist() == [0.0, 1.0]


@pytest.fixture(scope="module")
def tools_model(tools_model_path):
    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    policy = load_policy(ModelSpec(name=f"builtin:{builtin_model.TOOLS_NAME}", dtype="float32",
                                   lora={"r": 8, "alpha": 16}), kl_beta=0.0)
    return policy.model, policy.tokenizer


class RecordingStepper:
    """Wraps the real stepper: for every token fed back to it, the logits it was sampled from, per row."""

    def __init__(self, inner):
        self.inner, self.rows, self.latest = inner, [], None
        self.fed: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, input_ids, attention_mask, samples):
        logits = self.inner.prefill(input_ids, attention_mask, samples)
        self.rows, self.latest = list(range(logits.shape[0])), logits.clone()
        self.fed = {row: [] for row in self.rows}
        return logits

    def keep(self, rows):
        self.inner.keep(rows)
        self.rows, self.latest = [self.rows[i] for i in rows.tolist()], self.latest[rows]

    def step(self, tokens, live):
        for i, row in enumerate(self.rows):
            if live[i]:
                self.fed[row].append((int(tokens[i]), self.latest[i].clone()))
        out = self.inner.step(tokens, live)
        self.latest = torch.where(live[:, None], out, self.latest)
        return out

    def append(self, tokens, valid):
        out = self.inner.append(tokens, valid)
        self.latest = torch.where(valid.any(1)[:, None], out, self.latest)
        return out


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph decoder needs a CUDA device")


@pytest.mark.parametrize("lean, device", [(True, "cpu"), (False, "cpu"), pytest.param(True, "cuda", marks=CUDA)],
                         ids=["lean decoder", "transformers cache", "lean decoder, CUDA graphs"])
def test_each_token_was_sampled_from_what_a_plain_forward_over_the_transcript_gives(tools_model, lean, device,
                                                                                   monkeypatch):
    """Sampling with calls appended to the caches of some rows while others decode (and pause): the logits
    every model token was drawn from equal one plain forward over prompt + transcript, tool output included
    as context. A cache, a position or a paused row's slot gone wrong would show here. On a GPU the lean
    decoder replays its steps as CUDA graphs between the appends and the packs."""
    import copy

    from grpo_cli.rollout import sampling as rollout_module

    model, tokenizer = tools_model
    if device == "cuda":
        model = copy.deepcopy(model).cuda()
    tolerance = 1e-4 if device == "cpu" else 2e-3  # GPU kernels sum in another order
    recorders = []
    original = rollout_module.decode_with_tools

    def recording(stepper, *args):
        recorders.append(RecordingStepper(stepper))
        return original(recorders[-1], *args)

    monkeypatch.setattr(rollout_module, "decode_with_tools", recording)
    packs = []
    pack = decoder.LeanDecoder._pack
    monkeypatch.setattr(decoder.LeanDecoder, "_pack", lambda self: (packs.append(self.length), pack(self))[1])
    problems = builtin_task.test_split()[:12]
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, [p.question for p in problems],
                       Sampling(max_new_tokens=96, samples_per_prompt=4, lean=lean), tools=InProcessTools())
    used = rollout.tool_use.calls > 0
    assert 0 < int(used.sum()) < len(used), "the warm-started model calls the tool in some completions, not all"
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=position_ids(rollout.attention_mask)).logits[:, rollout.prompt_len - 1 : -1]
    fed = recorders[0].fed
    checked = 0
    for row in range(len(rollout.texts)):
        positions = rollout.action_mask[row].nonzero().squeeze(1).tolist()
        assert len(fed[row]) in (len(positions), len(positions) - 1)  # all but an ending EOS are fed back
        for (token, drawn_from), position in zip(fed[row], positions):
            assert token == int(rollout.completion_ids[row, position])
            torch.testing.assert_close(drawn_from.log_softmax(-1), logits[row, position].log_softmax(-1),
                                       atol=tolerance, rtol=tolerance)
            # and the log-prob the sampler recorded for it is the plain forward's (the update compares the two)
            recorded, plain = float(rollout.sampler_logp[row, position]), float(logits[row, position].float()
                                                                                .log_softmax(-1)[token])
            assert abs(recorded - plain) < tolerance, (row, position, recorded, plain)
            checked += 1
    assert (rollout.sampler_logp[rollout.tool_mask] == 0).all()  # tool output was not drawn: nothing recorded
    assert checked > 500
    if lean:  # the pauses and outputs filled the cache's columns: it was packed, and the logits still agree
        assert packs
    golds = [p.answer for p in problems for _ in range(4)]
    for i in used.nonzero().squeeze(1).tolist():
        assert "\n```output\n" in rollout.texts[i]
    assert any(is_correct(rollout.texts[i], golds[i]) for i in used.nonzero().squeeze(1).tolist())


def test_the_same_seed_gives_the_same_transcripts_and_both_engines_agree(tools_model):
    model, tokenizer = tools_model
    prompts = [p.question for p in builtin_task.test_split()[:8]]
    runs = []
    for lean in (True, True, False):
        torch.manual_seed(3)
        runs.append(generate(model, tokenizer, prompts, Sampling(max_new_tokens=96, samples_per_prompt=4, lean=lean),
                             tools=InProcessTools()))
    assert runs[0].texts == runs[1].texts == runs[2].texts
    assert torch.equal(runs[0].tool_mask, runs[2].tool_mask)
    assert runs[0].tool_use.calls.sum() > 0
    # what the tool printed, read from the text alone, is what the masks say
    assert [tool_calls.printed_spans(t) for t in runs[0].texts] == runs[0].tool_outputs
    assert sum(map(len, runs[0].tool_outputs)) == runs[0].tool_use.calls.sum()


def test_the_plain_engine_refuses_tools(tools_model):
    from grpo_cli.config.recipe import RecipeError, validate

    with pytest.raises(RecipeError, match="fast engine") as refused:  # the recipe, before anything loads
        validate({"grpo": {"tools": ["python"], "engine": "plain"}})
    assert "engine: fast" in str(refused.value)
    model, tokenizer = tools_model
    with pytest.raises(ValueError, match="fast engine"):
        generate(model, tokenizer, ["What is 2 + 3?"], Sampling(max_new_tokens=8, engine="generate"),
                 tools=InProcessTools())


def test_a_sandbox_server_that_dies_mid_rollout_is_restarted_and_the_rollout_goes_on(char_tokenizer):
    """The server killed while a row's call runs (nothing a call does should kill it: this is the net below
    that): that call's output says so, a row that calls afterwards is served by the new server, and the
    rollout's ToolUse counts the restart, which becomes the step's tool_restarts."""
    import os
    import signal

    texts = ["\n```python\nimport time\ntime.sleep(30)\n```The answer is 1.",
             "\n" + "a" * 40 + "\n```python\nprint(6 * 7)\n```The answer is 42."]
    eos = char_tokenizer.eos_token_id
    scripts = [char_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]

    class KillingStepper(ScriptedStepper):
        """Kills the server once, at the first step after a call was sent to it."""

        killed = False

        def step(self, tokens, live):
            if not self.killed and session.sandbox._pending:
                os.kill(session.sandbox._server.pid, signal.SIGKILL)
                self.killed = True
            return super().step(tokens, live)

    stepper = KillingStepper(scripts, len(char_tokenizer))
    prompt = torch.ones(2, 2, dtype=torch.long)
    with ToolSession(ToolSettings(timeout_s=60)) as session:
        decoded = decode_with_tools(stepper, char_tokenizer, prompt, torch.ones_like(prompt),
                                    Sampling(max_new_tokens=200, greedy=True), [eos], session)
        tokens, use = decoded.tokens, decoded.tool_use
    out = [char_tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
    assert stepper.killed and use.restarts == 1
    assert "```output\nthe sandbox's server died during this call; it was restarted\n```" in out[0]
    assert "```output\n42\n```" in out[1]
    assert use.calls.tolist() == [1, 1] and use.errors.tolist() == [1, 0]
