"""The engine stops a stage on a non-finite loss and a prompt never loses the tokens next to its answer."""
import pytest

from piece_cl.data.collate import IGNORE_INDEX, encode_record
from piece_cl.errors import PieceError
from piece_cl.evaluation.generation import generate
from piece_cl.methods.seqft import SeqFT
from tests import methods_kit as kit


class NaNLoss(SeqFT):
    def loss(self, ctx, batch, out):
        return out.loss * float("nan")


def test_non_finite_loss_stops_the_stage_and_leaves_the_weights(tmp_path):
    method = NaNLoss(kit.method("seqft").cfg)
    runner = kit.Runner(method, kit.model(), tmp_path)
    before = kit.snapshot(runner.engine.model)
    with pytest.raises(PieceError, match="non-finite loss"):
        runner.stage(0, [kit.task("a")])
    after = kit.snapshot(runner.engine.model)
    assert all(before[n].equal(after[n]) for n in before)


def test_over_long_prompts_are_truncated_on_the_left():
    tok = kit.tokenizer()
    record = {"prompt": "task " + " ".join(kit.WORDS * 4) + " final ?", "answer": "red green"}
    encoded = encode_record(tok, record, max_prompt_len=6, max_answer_len=8)
    prompt_ids = [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label == IGNORE_INDEX]
    assert len(prompt_ids) == 6
    assert tok.decode(prompt_ids).strip().endswith("final ?")
    assert encoded["labels"][-1] == tok.eos_token_id


def test_over_long_test_prompts_are_truncated_on_the_left_in_generation():
    """Evaluation sees what training saw: the last max_prompt_len tokens of an over-long prompt."""
    tok = kit.tokenizer()
    model = kit.model()
    side = tok.padding_side
    prompt = "task " + " ".join(kit.WORDS * 4) + " final ?"
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return original(**kwargs)

    model.generate = spy
    generate(model, tok, [prompt], max_new_tokens=2, max_prompt_len=6)
    generate(model, tok, [prompt], max_new_tokens=2)
    full = tok(prompt)["input_ids"]
    assert seen[0][0].tolist() == full[-6:] and seen[1].shape[1] == len(full) > 6
    assert tok.padding_side == side  # the tokenizer is left as it was
