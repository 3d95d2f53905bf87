"""tools/benchmarks + tools/benchmark.py: interleaving, medians and ratios, faithful baselines, the report's schema.

No test asserts a time: speed is measured by the command, never checked here.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.data import default_collate

from common.diffusion.latent_space import ScaledLatentSpace
from common.diffusion.requests import SeededNoised, sample_requests
from common.diffusion.sampling import ControlNetGuidedSampler, GuidedLatentSampler
from common.diffusion.schedules import SchedulerSettings
from common.engines.prepare_batch import LatentDiffusionPrepareBatch, PromptSamplingPrepareBatch
from tests.conftest import (
    IMAGE_SIZE,
    LATENT,
    CallRecorder,
    make_autoencoder,
    make_controlnet,
    make_prompt_encoder,
    make_unet,
)
from tools import benchmark
from tools.benchmarks import sampling as bench_sampling
from tools.benchmarks import training as bench_training
from tools.benchmarks.timing import (
    HWM_RESET,
    PeakRSS,
    Trial,
    interleaved_order,
    markdown_table,
    ratio,
    run_interleaved,
    summarize,
)

CANDIDATE_KEYS = {
    "seconds_per_call",
    "seconds_per_item",
    "time_ratio",
    "paired_ratio",
    "peak_rss_mib",
    "rss_increase_mib",
}
REPORT_KEYS = {
    "benchmark",
    "bundle",
    "command",
    "date",
    "machine",
    "settings",
    "order",
    "baseline",
    "memory_method",
    "agreement",
    "candidates",
}
MACHINE_KEYS = {
    "cpu_model",
    "logical_cpus",
    "cpu_capability",
    "bf16_cpu_flags",
    "native_bf16",
    "torch_threads",
    "torch",
    "monai",
}


# --- timing -------------------------------------------------------------------------------------------------------


def test_interleaved_order_repeats_whole_rounds():
    assert interleaved_order(["a", "b", "c"], 2) == ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ValueError, match="repeats"):
        interleaved_order(["a"], 0)
    with pytest.raises(ValueError, match="distinct"):
        interleaved_order(["a", "a"], 1)


def test_run_interleaved_times_each_call_with_the_clock_in_round_order():
    calls: list[str] = []
    ticks = itertools.count()  # the clock advances by 1 per reading: each call lasts exactly one tick
    trials = run_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, clock=lambda: float(next(ticks))
    )
    assert calls == ["a", "b"] * 3
    assert [(t.name, t.round) for t in trials] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert all(t.seconds == 1.0 for t in trials)


def _trials(name: str, seconds: list[float]) -> list[Trial]:
    return [Trial(name, i, s, 100.0 + i, float(i), HWM_RESET) for i, s in enumerate(seconds)]


def test_summarize_gives_per_item_medians_and_both_ratios():
    trials = _trials("base", [2.0, 4.0, 100.0]) + _trials("fast", [1.0, 2.0, 3.0])
    summary = summarize(trials, items_per_call=2, baseline="base")
    fast = summary["fast"]
    assert fast["seconds_per_item"] == {"median": 1.0, "min": 0.5, "max": 1.5}
    assert fast["time_ratio"] == pytest.approx(2.0 / 4.0)
    # per round: 1/2, 2/4, 3/100 -> median 0.5; the slow third baseline round does not move it
    assert fast["paired_ratio"] == pytest.approx(0.5)
    assert summary["base"]["time_ratio"] == 1.0 and summary["base"]["paired_ratio"] == 1.0
    assert fast["peak_rss_mib"] == 102.0 and fast["rss_increase_mib"] == 2.0
    assert fast["seconds_per_call"] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="Baseline"):
        summarize(trials, 1, baseline="missing")
    with pytest.raises(ValueError, match="positive"):
        ratio(1.0, 0.0)


def test_markdown_table_rounds_floats_and_marks_missing_values():
    table = markdown_table(["a", "b"], [["x", 0.123456], ["y", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 0.1235 |", "| y | - |"]


def test_peak_rss_sees_a_tensor_and_is_reset_between_blocks():
    with PeakRSS() as big:
        block = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
        del block
    if big.method != HWM_RESET:
        pytest.skip("the peak of resident memory cannot be reset here")
    assert big.increase_mib > 48
    with PeakRSS() as small:
        torch.ones(1024)
    assert small.increase_mib < 48 and small.peak_mib < big.peak_mib + 1


# --- sampling: the baselines are faithful -----------------------------------------------------------------------


def _sampling_setup(guidance: float = 3.0, controlnet: bool = False, num_samples: int = 2, steps: int = 4):
    """Tiny networks wired as the bundles wire theirs: sampler, prepare_batch, collated requests with noise."""
    latent_space = ScaledLatentSpace(make_autoencoder(), scale_factor=0.5)
    settings = SchedulerSettings()
    unet = make_unet()
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "progress": False}
    items = [SeededNoised(LATENT)(r) for r in sample_requests("a brain", num_samples, seed=3)]
    condition_keys = None
    if controlnet:
        for i, item in enumerate(items):
            item["condition"] = torch.rand((1, *IMAGE_SIZE), generator=torch.Generator().manual_seed(i))
        network = make_controlnet().eval()
        sampler = ControlNetGuidedSampler(latent_space, settings, unet, conditioning_scale=1.5, **kwargs)
        condition_keys = {"controlnet_cond": "condition"}
    else:
        network = unet
        sampler = GuidedLatentSampler(latent_space, settings, **kwargs)
    batch = default_collate(items)
    if controlnet:
        denoise = bench_sampling.controlnet_denoiser(network, unet, batch["condition"], 1.5)
    else:
        denoise = bench_sampling.unet_denoiser(unet)
    return bench_sampling.SamplingSetup(
        bundle="tiny",
        sampler=sampler,
        network=network,
        prepare_batch=PromptSamplingPrepareBatch(make_prompt_encoder(), condition_keys=condition_keys),
        batch=batch,
        denoise=denoise,
        settings=settings,
    )


@pytest.mark.parametrize(
    "guidance, controlnet", [(3.0, False), (1.0, False), (0.0, False), (3.0, True), (1.0, True)], ids=str
)
def test_baselines_give_the_bundle_samplers_images_from_the_same_noise(guidance, controlnet):
    setup = _sampling_setup(guidance, controlnet)
    outputs = {name: run() for name, run in bench_sampling.sampling_candidates(setup).items()}
    assert list(outputs) == ["bundle", "zoo_batched", "seed_two_call", "monai_inferer", "bundle_bf16"]
    reference = outputs["bundle"]
    assert reference.shape == (2, 1, *IMAGE_SIZE) and reference.abs().max() > 0
    for name, images in outputs.items():
        if name != "bundle_bf16":  # bf16 rounds differently: close, not equal
            torch.testing.assert_close(images, reference, atol=1e-5, rtol=0, msg=name)
    assert bench_sampling.max_abs_difference(outputs["bundle_bf16"], reference) < 0.1
    # the samples differ from one another: the comparison is not between constant images
    assert bench_sampling.max_abs_difference(reference[:1], reference[1:]) > 1e-3


def test_a_baseline_with_another_guidance_is_caught():
    setup = _sampling_setup(guidance=3.0)
    other = _sampling_setup(guidance=2.0)
    bundle = bench_sampling.sampling_candidates(setup)["bundle"]()
    zoo = bench_sampling.sampling_candidates(other)["zoo_batched"]()
    agreement = bench_sampling.image_agreement({"bundle": bundle, "zoo_batched": zoo}, {"zoo_batched": True})
    assert agreement["zoo_batched"]["same"] is False
    assert bench_sampling.unexpected_differences(agreement) == ["zoo_batched"]


def test_benchmark_sampling_reports_agreement_and_the_constant_tensor_guidance_of_monai():
    result = bench_sampling.benchmark_sampling(_sampling_setup(guidance=3.0, num_samples=1, steps=2), repeats=2)
    assert result["order"] == ["bundle", "zoo_batched", "seed_two_call", "monai_inferer", "bundle_bf16"]
    assert result["baseline"] == "zoo_batched"
    for name in ("zoo_batched", "seed_two_call", "monai_inferer"):
        assert result["agreement"][name]["same"] and result["agreement"][name]["expected_same"]
    builtin = result["agreement"]["monai_builtin_cfg"]
    assert not builtin["expected_same"] and not builtin["same"]
    for name, c in result["candidates"].items():
        assert CANDIDATE_KEYS <= set(c) and len(c["seconds_per_call"]) == 2, name
    assert result["candidates"]["zoo_batched"]["time_ratio"] == 1.0
    assert "monai_builtin_cfg (untimed)" in bench_sampling.sampling_table(result)


def test_a_default_with_a_guidance_interval_is_timed_and_its_network_calls_reported():
    setup = _sampling_setup(guidance=3.0, num_samples=1, steps=10)
    default = setup.sampler.replaced(guidance_interval=(1.0, 10.0))
    setup.default_sampler = default
    result = bench_sampling.benchmark_sampling(setup, repeats=1)
    guided = default.guided_steps()
    assert 0 < guided < 10
    assert result["candidates"]["bundle_default"]["calls_per_step"] == f"1 x 2B on {guided} of 10 steps, else 1 x B"
    assert result["candidates"]["bundle"]["calls_per_step"] == "1 x 2B"
    assert not result["agreement"]["bundle_default"]["expected_same"]  # another sampler: not checked for equality


def test_a_guidance_distilled_default_runs_its_own_network_once_per_step():
    """The default sampler with a guidance-distilled UNet: that network, one call of B per step, reported so; the
    reference and the anchors keep the diffusion model."""
    setup = _sampling_setup(guidance=3.0, num_samples=2, steps=3)
    student, teacher = CallRecorder(make_unet(seed=4)), CallRecorder(setup.network)
    setup.network = teacher
    setup.default_network = student
    setup.default_sampler = setup.sampler.replaced(distilled_guidance=3.0, precision="bf16")
    result = bench_sampling.benchmark_sampling(setup, repeats=1)
    assert result["candidates"]["bundle_default"]["calls_per_step"] == "1 x B (guidance-distilled UNet)"
    assert "bundle_bf16" in result["candidates"], "the diffusion model in bf16 is timed apart from the student"
    assert result["candidates"]["bundle"]["calls_per_step"] == "1 x 2B"
    assert student.batch_sizes == [2] * 3 * 2  # warm-up and one timed round, 3 steps each
    assert set(teacher.batch_sizes) == {4}  # the reference, the anchors and bundle_bf16
    assert not result["agreement"]["bundle_default"]["expected_same"]


def test_the_compiled_candidate_compiles_a_copy_of_the_default_sampler_and_leaves_the_default_alone():
    setup = _sampling_setup(guidance=3.0, num_samples=1, steps=2)
    default = setup.sampler.replaced(precision="bf16")
    setup.default_sampler = default
    candidates = bench_sampling.sampling_candidates(setup, compile=True)
    assert list(candidates)[-2:] == ["bundle_default", "bundle_default_compiled"]
    compiled = candidates["bundle_default_compiled"].__closure__
    samplers = [c.cell_contents for c in compiled if isinstance(c.cell_contents, bench_sampling.GuidedLatentSampler)]
    assert len(samplers) == 1 and samplers[0].compile and samplers[0].precision == "bf16"
    assert not default.compile and not setup.sampler.compile and samplers[0].scheduler is not default.scheduler
    assert "bundle_default_compiled" not in bench_sampling.sampling_candidates(setup)


# --- training -----------------------------------------------------------------------------------------------------


def training_names() -> list[str]:
    """Training candidates: the cached-latents trainers (fp32, bf16) only where this checkout has the latent cache."""
    has_cache = bench_training.moment_keys() is not None
    cached = ["bundle_cached_latents", "bundle_cached_latents_bf16"] if has_cache else []
    return [*cached, "bundle_encoding", "seed_style", "encode_only"]


def _training_setup():
    from monai.inferers import DiffusionInferer

    from common.engines.precision import AutocastInferer

    prompt_encoder = make_prompt_encoder()
    latent_space = ScaledLatentSpace(make_autoencoder(), scale_factor=0.5)
    scheduler = SchedulerSettings().build("ddpm")
    return bench_training.TrainingSetup(
        network=make_unet(),
        prepare_batch=LatentDiffusionPrepareBatch(latent_space, prompt_encoder, scheduler),
        inferer=AutocastInferer(DiffusionInferer(scheduler), "fp32"),  # as train#inferer
        loss_function=torch.nn.MSELoss(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        amp=False,
        batches=bench_training.make_batches(2, 3, IMAGE_SIZE, prompt_encoder.tokenizer),
    )


def test_seed_style_step_computes_the_bundles_training_loss():
    setup = _training_setup()
    assert bench_training.loss_agreement(setup, setup.batches[0]) < 1e-6
    cached = bench_training.cached_moment_batches(setup)
    if cached is not None:  # the checkout has the latent cache: the bundle reads moments, not images
        assert "image" not in cached[0] and bench_training.loss_agreement(setup, cached[0]) < 1e-6


def test_a_different_objective_is_caught():
    setup = _training_setup()
    setup.prepare_batch.scheduler.prediction_type = "epsilon"  # the bundle's target becomes the noise, not v
    assert bench_training.loss_agreement(setup, setup.batches[0]) > 1e-3


def test_training_candidates_train_their_own_copies_on_the_same_batches():
    setup = _training_setup()
    before = {k: v.clone() for k, v in setup.network.state_dict().items()}
    result = bench_training.benchmark_training(setup, repeats=1)
    assert result["order"] == training_names()
    assert set(result["warmup_seconds"]) == set(result["order"]), "warm-ups (a compilation) are reported apart"
    assert result["candidates"]["seed_style"]["time_ratio"] == 1.0
    assert CANDIDATE_KEYS <= set(result["candidates"]["bundle_encoding"])
    for key, value in setup.network.state_dict().items():  # the shared initial network is never trained
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert setup.images_per_call == 6


def test_phantom_captions_are_reproducible_and_partly_empty():
    captions = bench_training.phantom_captions(200, seed=1)
    assert captions == bench_training.phantom_captions(200, seed=1)
    assert 5 < captions.count("") < 40
    assert all(c == "" or c.startswith("T1-weighted image of a brain of a ") for c in captions)


# --- the command --------------------------------------------------------------------------------------------------


@pytest.fixture
def thread_env(monkeypatch):
    """The command sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``: restore them after the test."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")


def _check_report(path, kind: str, candidates: list[str], repeats: int) -> dict:
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["benchmark"] == kind and report["command"].startswith(f"benchmark-bundles {kind} ")
    assert MACHINE_KEYS <= set(report["machine"]) and report["machine"]["torch_threads"] == 1
    assert isinstance(report["machine"]["native_bf16"], bool)
    assert report["order"] == candidates
    for name in candidates:
        c = report["candidates"][name]
        assert CANDIDATE_KEYS <= set(c) and len(c["seconds_per_call"]) == repeats
        assert set(c["seconds_per_item"]) == {"median", "min", "max"}
        assert all(isinstance(v, float) for v in c["seconds_per_item"].values())
    return report


def test_sampling_command_writes_the_json_report(tmp_path, monkeypatch, capsys, thread_env):
    monkeypatch.setattr(bench_sampling, "load_sampling_setup", lambda *a, **k: _sampling_setup(steps=2, num_samples=1))
    output = tmp_path / "out" / "sampling.json"
    benchmark.sampling(bundle="brain_t1_ldm", num_samples=1, steps=2, guidance=3, repeats=2, output=str(output))
    report = _check_report(
        output, "sampling", ["bundle", "zoo_batched", "seed_two_call", "monai_inferer", "bundle_bf16"], 2
    )
    assert report["settings"]["steps"] == 2 and report["settings"]["guidance"] == 3.0
    assert all(isinstance(a["max_abs_diff_vs_bundle"], float) for a in report["agreement"].values())
    printed = capsys.readouterr().out
    assert "| candidate |" in printed and report["command"] in printed


def test_training_command_writes_the_json_report(tmp_path, monkeypatch, thread_env):
    monkeypatch.setattr(bench_training, "load_training_setup", lambda *a, **k: _training_setup())
    output = tmp_path / "training.json"
    benchmark.training(bundle="brain_t1_ldm", batch_size=3, iterations=2, repeats=1, output=str(output))
    report = _check_report(output, "training", training_names(), 1)
    bf16 = report["agreement"].pop("bundle_cached_latents_bf16")["loss_abs_diff_vs_seed_style"]
    assert all(a["loss_abs_diff_vs_seed_style"] < 1e-6 for a in report["agreement"].values())
    assert bf16 < 0.05, "bf16 autocast: the same objective up to its rounding"
    assert report["settings"]["batch_size"] == 3 and report["settings"]["iterations"] == 2


def test_the_data_loader_candidate_reads_the_config_s_loader_one_run_at_a_time(tmp_path):
    setup = bench_training.load_training_setup(
        benchmark.REPO_BUNDLES / "brain_t1_ldm", batch_size=2, iterations=2, dataset_size=6, work_dir=tmp_path
    )
    assert len(setup.data_loader.dataset) == 6 and len(list(tmp_path.glob("slice_*.nii.gz"))) == 6
    batches = bench_training.FirstBatches(setup.data_loader, 2)
    for _ in range(2):  # every pass is `count` batches of the configured size, however often it is restarted
        taken = list(batches)
        assert len(taken) == 2 and all(b["z_mu"].shape[0] == 2 and len(b["caption"]) == 2 for b in taken)
    trainer = bench_training.bundle_trainer(setup, setup.network, batches)
    trainer.run()
    trainer.run()
    assert trainer.state.iteration == 2, "a restarted run takes `count` batches, not the whole loader"
    assert "bundle_cached_latents_bf16_data_loader" in bench_training.training_candidates(setup)


def test_bad_arguments_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        benchmark.sampling(num_samples=0)
    with pytest.raises(ValueError, match="No bundle 'nope'"):
        benchmark.sampling(bundle="nope")
    with pytest.raises(ValueError, match="train_diffusion.json"):
        benchmark.training(bundle="flair_to_t1_controlnet")
    with pytest.raises(ValueError, match="dataset_size"):
        benchmark.training(batch_size=32, iterations=5, dataset_size=100)
    assert not list(tmp_path.iterdir())


def test_the_shipped_bundle_loads_and_its_baselines_agree():
    setup = bench_sampling.load_sampling_setup(
        benchmark.REPO_BUNDLES / "brain_t1_ldm", num_samples=1, steps=2, guidance=2.0, eta=0.0, seed=0
    )
    # the shipped defaults sample guidance 2 with the guidance-distilled UNet; the reference with the diffusion model
    assert setup.default_sampler.distilled_guidance == 2.0 and setup.sampler.distilled_guidance is None
    assert setup.default_network is not None and setup.default_network is not setup.network
    outputs = {name: run() for name, run in bench_sampling.sampling_candidates(setup).items()}
    bf16 = outputs.pop("bundle_bf16")
    # the config's own 50 steps, not the benchmark's 2: what a run without options computes
    default = outputs.pop("bundle_default")
    assert default.shape == outputs["bundle"].shape and torch.isfinite(default).all()
    for images in outputs.values():
        assert bench_sampling.max_abs_difference(images, outputs["bundle"]) <= bench_sampling.SAME_IMAGE_ATOL
    assert bench_sampling.max_abs_difference(bf16, outputs["bundle"]) < 0.05  # bf16 autocast: close, not equal


def test_the_shipped_training_configs_load_and_match_the_seed_objective():
    setup = bench_training.load_training_setup(benchmark.REPO_BUNDLES / "brain_t1_ldm", batch_size=2, iterations=1)
    assert setup.batches[0]["image"].shape[0] == 2 and setup.batches[0]["input_ids"].shape == (2, 77)
    assert bench_training.loss_agreement(setup, setup.batches[0]) < 1e-6
    bf16 = bench_training.bf16_inferer(setup)
    assert bf16 is not None and bf16.precision == "bf16", "the config's precision option gives the bf16 candidate"
    assert bench_training.loss_agreement(setup, setup.batches[0], inferer=bf16) < 0.05
