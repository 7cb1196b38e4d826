"""trainer=deepspeed on CPU (gloo, 2 ranks): every method gives the same result as one process at equal
global batch under ZeRO-2, ZeRO-2 + offload and ZeRO-3 with its mechanism intact, PIECE's frozen entries
bit-identical, settings a method cannot honour refused, and a launcher that keeps Hydra in the parent."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from piece_cl.cli import CONFIG_DIR, validate
from piece_cl.errors import PieceError
from piece_cl.rank import parse

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "deepspeed_worker.py")
# fp32 sums in a different order (rank-local accumulation, then the reduction): equal to ~1e-6.
WEIGHT_TOLERANCE = 1e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def run_worker(out: Path, methods: str, overrides: list[str], ranks: int) -> dict:
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    done = subprocess.run([*launcher, WORKER, str(out), methods, *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a.keys() & b.keys())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process torch-engine runs (global batch 8 = micro 2 x 4 accumulation) of the given methods."""
    cache: dict[tuple, dict] = {}

    def get(methods: str, *extra: str) -> dict:
        key = (methods, *extra)
        if key not in cache:
            out = tmp_path_factory.mktemp("reference") / "reference.pt"
            cache[key] = run_worker(out, methods, ["trainer=torch", *extra], ranks=1)
        return cache[key]

    return get


def test_rank_entry_ignores_launcher_arguments(tmp_path):
    """`deepspeed` passes --local_rank: the rank accepts and drops it; it has no Hydra arguments at all."""
    assert parse(["--local_rank=1", str(tmp_path)]) == tmp_path
    assert parse([str(tmp_path), "--local-rank", "0"]) == tmp_path
    with pytest.raises(SystemExit):
        parse([str(tmp_path), "method=seqft"])


def test_more_than_one_node_uses_a_c10d_rendezvous_and_names_what_it_needs(tmp_path, monkeypatch):
    from piece_cl.launch import node_rank, torchrun_command

    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_NODEID", "1")
    trainer = OmegaConf.create({"nproc_per_node": 8, "nnodes": 2, "node_rank": None, "rdzv_endpoint": None,
                                "rdzv_id": None, "master_port": None})
    with pytest.raises(PieceError, match="trainer.nnodes=2 needs trainer.rdzv_endpoint=HOST:PORT"):
        torchrun_command(trainer, tmp_path)
    trainer.rdzv_endpoint = "node0:29400"
    command = torchrun_command(trainer, tmp_path)
    assert "--rdzv_backend=c10d" in command and "--rdzv_endpoint=node0:29400" in command and "--nnodes=2" in command
    assert [a for a in command if a.startswith("--rdzv_id=")] == [a for a in torchrun_command(trainer, tmp_path)
                                                                  if a.startswith("--rdzv_id=")]  # same on every node
    assert node_rank(trainer) == 1  # from SLURM when not given
    trainer.node_rank = 0
    assert node_rank(trainer) == 0


BASELINES = ("seqft", "ewc", "gem", "lwf", "replay", "seqlora", "olora", "layernorm", "migu")
ZERO3_BLOCKED = ("ewc", "gem", "olora")  # refused by check_trainer, see test_zero3_refusals
SETTINGS = {
    "zero2": (["trainer.zero_stage=2"], BASELINES),
    "zero2_offload": (["trainer.zero_stage=2", "trainer.offload_optimizer=true"], BASELINES),
    "zero3": (["trainer.zero_stage=3"], tuple(m for m in BASELINES if m not in ZERO3_BLOCKED)),
}
# GEM runs 18 steps at lr 1e-2 (it needs conflicts to project) and its QP passes the summation-order noise
# on: measured 9.6e-5 (ZeRO-2) and 5.3e-4 (offload) against a largest weight move of 0.18.
GEM_WEIGHT_TOLERANCE = 2e-3


def unchanged(before: dict, after: dict, keep) -> None:
    """Every tensor whose name passes `keep` is bit-identical; at least one tensor is checked."""
    names = [n for n in before if keep(n)]
    assert names
    for name in names:
        assert torch.equal(before[name], after[name]), name


def assert_mechanism(name: str, ds: dict, ref: dict) -> None:
    """The evidence that the method acted under DeepSpeed (see tests/deepspeed_worker.py)."""
    evidence, stages = ds["evidence"], ds["stages"]
    if name == "ewc":
        assert stages[1]["penalty"] > 0
        assert stages[1]["penalty"] == pytest.approx(ref["stages"][1]["penalty"], rel=1e-3)
    elif name == "gem":  # projected, and the gradient the engine then held satisfies every constraint
        assert evidence["gem_projections"] == ref["evidence"]["gem_projections"] > 0
        assert min(min(c) for c in evidence["projected_cosines"]) > -1e-6
    elif name == "lwf":
        assert stages[1]["distillation"] > 0
    elif name == "replay":  # the replay phase trained on the first task's sample after the second task
        assert evidence["global_step"] == ref["evidence"]["global_step"] > ds["steps"]
    elif name in ("seqlora", "olora"):
        unchanged(ds["before"], ds["after"], lambda n: "lora_" not in n)
        assert any(not torch.equal(ds["before"][n], v) for n, v in ds["after"].items() if "lora_B" in n)
    elif name == "layernorm":
        unchanged(ds["before"], ds["after"], lambda n: "norm" not in n)
    elif name == "migu":
        for tensor, before in ds["before"].items():
            selected = torch.zeros(before.numel(), dtype=torch.bool)
            for stage in stages:
                if tensor in stage["masks"]:
                    selected[stage["masks"][tensor]] = True
            assert torch.equal(ds["after"][tensor].reshape(-1)[~selected], before.reshape(-1)[~selected]), tensor
    if name == "olora":  # task_0's adapter froze when task_1's began; task_1 started at B = 0 and learned
        first, second = stages[0]["adapters"], stages[1]["adapters"]
        for key, value in first.items():
            assert torch.equal(second[key], value), key
        assert any(v.abs().sum() > 0 for k, v in second.items() if "lora_B.task_1" in k)


@pytest.mark.distributed
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_method_on_two_ranks_matches_one_process_and_acts(tmp_path, reference, setting):
    """2 gloo ranks under DeepSpeed vs the torch engine in one process at equal global batch, per method."""
    overrides, methods = SETTINGS[setting]
    ref_all = reference(",".join(BASELINES))
    ds_all = run_worker(tmp_path / "ds.pt", ",".join(methods), ["trainer=deepspeed", *overrides], ranks=2)
    for name in methods:
        ds, ref = ds_all[name], ref_all[name]
        assert ds["world_size"] == 2 and ds["steps"] == ref["steps"], name
        assert max_difference(ref["after"], ref["before"]) > 1e-3, name  # training moved the weights
        tolerance = GEM_WEIGHT_TOLERANCE if name == "gem" else WEIGHT_TOLERANCE
        assert max_difference(ds["after"], ref["after"]) < tolerance, name
        for a, b in zip(ds["stats"], ref["stats"]):
            assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-3 if name == "gem" else 1e-6), name
        assert_mechanism(name, ds, ref)


def test_engine_settings_a_method_cannot_honour_are_refused():
    """Settings a method cannot honour are refused in the parent, before anything loads."""
    def check(*overrides: str) -> None:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            validate(compose("config", overrides=["trainer=deepspeed", *overrides]))

    for name in ZERO3_BLOCKED:
        with pytest.raises(PieceError, match=f"method={name} cannot run under trainer.zero_stage=3"):
            check(f"method={name}", "trainer.zero_stage=3")
        check(f"method={name}", "trainer.zero_stage=2")
    for key in ("offload_optimizer", "offload_param"):
        with pytest.raises(PieceError, match=f"trainer.{key}=true would be ignored"):
            check("method=piece_s", "trainer.zero_stage=3", f"trainer.{key}=true")
    check("method=piece_s", "trainer.zero_stage=3")
    check("method=seqlora", "trainer.zero_stage=3", "trainer.offload_optimizer=true", "trainer.offload_param=true")
    with pytest.raises(PieceError, match="epoch_checkpoints=true under trainer=deepspeed needs an optimiser outside"):
        check("method=seqft", "trainer.epoch_checkpoints=true")
    check("method=piece_f", "trainer.epoch_checkpoints=true")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_piece_s_two_ranks_equal_and_outside_mask_bit_identical(tmp_path, reference, stage):
    ref = reference("piece_s", "method.ratio=0.05")["piece_s"]
    ds = run_worker(tmp_path / "piece.pt", "piece_s", ["trainer=deepspeed", f"trainer.zero_stage={stage}",
                                                       "method.ratio=0.05"], ranks=2)["piece_s"]
    assert max_difference(ds["after"], ref["after"]) < WEIGHT_TOLERANCE
    changed = 0
    for name, before in ds["before"].items():
        selected = torch.zeros(before.numel(), dtype=torch.bool)
        for masks in ds["masks"]:
            if name in masks:
                selected[masks[name]] = True
        after = ds["after"][name].reshape(-1)
        assert torch.equal(after[~selected], before.reshape(-1)[~selected]), name  # exact bits
        changed += int((after[selected] != before.reshape(-1)[selected]).sum())
    assert changed > 0


PIECE_RUN = ["experiment=smoke", "model.pretrain.steps=5", "model.pretrain.problems=40",
             "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.train_size=16", "benchmark.eval_size=4",
             "benchmark.test_size=4", "benchmark.probe.n_problems=4", "eval.probe_before=false",
             "eval.batch_size=2", "model.batch_size=8", "trainer.micro_batch_size=2"]


def piece_run(root: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "PIECE_OUTPUT_ROOT": str(root / "out"), "PIECE_CACHE_DIR": str(root / "cache")}
    env.pop("PIECE_KILL_AT", None)
    if kill_at:
        env["PIECE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "piece_cl.cli", *PIECE_RUN, *extra], cwd=root, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> Path:
    """The torch engine's run of PIECE_RUN: the results every DeepSpeed layout must reproduce."""
    root = tmp_path_factory.mktemp("piece_run")
    done = piece_run(root, "hydra.run.dir=torch")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "torch"


@pytest.mark.distributed
def test_piece_run_two_ranks_one_run_dir_same_results_as_torch(torch_run):
    """`piece-run trainer=deepspeed trainer.nproc_per_node=2`: one run directory, the layout recorded,
    and the same R matrix and final weights as the torch engine at the same global batch."""
    root = torch_run.parent
    done = piece_run(root, "trainer=deepspeed", "trainer.nproc_per_node=2", "run_name=deepspeed")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((root / "out").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("deepspeed")  # one run directory, not one per rank
    ds_dir = runs[0]
    config = OmegaConf.load(ds_dir / "config.yaml")
    assert config.world_size == 2 and config.distributed.accumulation == 2 and config.distributed.zero_stage == 2
    assert config.versions.deepspeed != "not installed"
    assert_same_results(torch_run, ds_dir)
    weights = [load_file(d / "checkpoint" / "stage_1" / "model.safetensors") for d in (torch_run, ds_dir)]
    # Adam divides by sqrt(v): entries with near-zero gradients turn the ~1e-7 summation-order difference
    # into up to a few e-5 after 4 steps at lr 1e-3 (measured 4.5e-5); a tenth of one step's largest move.
    assert max_difference(weights[0], weights[1]) < 1e-4


def assert_same_results(one_process: Path, two_ranks: Path) -> None:
    """The R matrix and every stage's predictions equal one process's; each rank generated half of them."""
    results = [OmegaConf.load(d / "results.json") for d in (one_process, two_ranks)]
    assert results[0].R == results[1].R and results[1].stages_done == 2
    for stage, seen in (("stage_0_tiny_choice", 1), ("stage_1_tiny_number", 2)):
        predictions = [(d / stage / "predictions.jsonl").read_text() for d in (one_process, two_ranks)]
        assert predictions[0] == predictions[1] and predictions[0].count("\n") == 4 * seen + 4
        work = [OmegaConf.load(d / stage / "metrics.json").evaluation.prompts_per_rank for d in (one_process, two_ranks)]
        # eval batches of 2: each task's 4 prompts and the probe's 4 problems split batch by batch
        assert work[0] == [4 * seen + 4] and list(work[1]) == [2 * seen + 2] * 2


@pytest.mark.distributed
def test_two_nodes_of_one_rank_on_loopback_match_one_process(torch_run):
    """trainer.nnodes=2: two `piece-run`s (node 0 and node 1, one rank each) on one shared run directory,
    joined by torchrun's c10d rendezvous on loopback, give one process's R matrix and predictions."""
    from piece_cl.training.deepspeed_engine import free_port

    root = torch_run.parent
    env = {**ENV, "PIECE_OUTPUT_ROOT": str(root / "out"), "PIECE_CACHE_DIR": str(root / "cache")}
    env.pop("PIECE_KILL_AT", None)
    nodes = ["trainer=deepspeed", "trainer.nproc_per_node=1", "trainer.nnodes=2", "hydra.run.dir=two_nodes",
             f"trainer.rdzv_endpoint=127.0.0.1:{free_port()}"]
    started = [subprocess.Popen([sys.executable, "-m", "piece_cl.cli", *PIECE_RUN, *nodes, f"trainer.node_rank={rank}"],
                                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in (1, 0)]  # the second node first: it waits for the first to prepare the directory
    outputs = [node.communicate(timeout=600) for node in started]
    assert [node.returncode for node in started] == [0, 0], [err[-3000:] for _, err in outputs]
    config = OmegaConf.load(root / "two_nodes" / "config.yaml")
    assert config.world_size == 2 and config.distributed.nnodes == 2 and config.distributed.nproc_per_node == 1
    assert_same_results(torch_run, root / "two_nodes")


@pytest.mark.distributed
def test_piece_s_two_ranks_killed_between_epochs_resume_to_the_one_process_results(tmp_path):
    """PIECE-S end to end (importance on every rank, its O(k) optimiser data-parallel, epoch states kept by
    rank 0): a 2-rank run SIGKILLed after the first epoch of stage 2 continues there and ends with the torch
    engine's masks, R matrix and weights."""
    run = ["method=piece_s", "model.epochs=2"]
    done = piece_run(tmp_path, *run, "hydra.run.dir=torch")
    assert done.returncode == 0, done.stderr[-3000:]
    ds = [*run, "hydra.run.dir=ds", "trainer=deepspeed", "trainer.nproc_per_node=2", "trainer.epoch_checkpoints=true"]
    killed = piece_run(tmp_path, *ds, kill_at="epoch@1")
    assert killed.returncode == 2 and OmegaConf.load(tmp_path / "ds" / "results.json").stages_done == 1
    resumed = piece_run(tmp_path, *ds, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "task 'tiny_number': continuing after epoch 1/2" in resumed.stdout + resumed.stderr
    dirs = [tmp_path / "torch", tmp_path / "ds"]
    results = [OmegaConf.load(d / "results.json") for d in dirs]
    assert results[0].R == results[1].R and results[1].stages_done == 2
    masks = [load_file(d / "stage_1_tiny_number" / "mask.safetensors") for d in dirs]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    weights = [load_file(d / "checkpoint" / "stage_1" / "model.safetensors") for d in dirs]
    assert max_difference(weights[0], weights[1]) < WEIGHT_TOLERANCE


@pytest.mark.distributed
def test_two_rank_run_killed_mid_stage_resumes_on_one_rank(torch_run):
    """SIGKILL in the second stage of a 2-rank ZeRO-2 run; the same command with one rank finishes it from
    the committed first stage, and the R matrix is the uninterrupted run's."""
    root = torch_run.parent
    run = ["trainer=deepspeed", "hydra.run.dir=resumed"]
    killed = piece_run(root, *run, "trainer.nproc_per_node=2", kill_at="step@1")
    assert killed.returncode == 2 and "the ranks stopped" in killed.stderr.splitlines()[-1]
    assert OmegaConf.load(root / "resumed" / "results.json").stages_done == 1
    resumed = piece_run(root, *run, "trainer.nproc_per_node=1", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after stage 1/2" in resumed.stdout + resumed.stderr
    config = OmegaConf.load(root / "resumed" / "config.yaml")
    assert config.world_size == 1 and config.distributed.accumulation == 4
    results = [OmegaConf.load(d / "results.json") for d in (torch_run, root / "resumed")]
    assert results[0].R == results[1].R and results[1].stages_done == 2
