"""Class-conditional sampling: labels in every form the pipeline takes (and their misuse, in one line), classifier-free
guidance as two UNet calls combined, per-image generators and callbacks, the label in every loss, the bound given
the label and without it against an oracle, sharing with stock diffusers through the repo's pipeline.py (from a
folder and from the Hub), and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAKE_TOKEN, REPO, pipeline_call_kwargs, random_unet, stock_diffusers_images
from PIL import Image

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet

NUM_CLASSES = 3


def _unet(learned: bool = False, num_classes: int | None = NUM_CLASSES, seed: int = 0):
    return random_unet(learned, seed, None if num_classes is None else num_classes + 1)  # the last row: the null label


def _pipeline(learned: bool = False, scheduler=None, **config) -> DDPMPipeline:
    variance = "learned_range" if learned else "fixed_small"
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=100, variance_type=variance)
    config.setdefault("id2label", {0: "a", 1: "b", 2: "c"})
    pipeline = DDPMPipeline(unet=_unet(learned), scheduler=scheduler, **config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _images(pipeline, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 5)
    return pipeline(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


# -- The label in every loss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_loss", [("fixed_small", "simple"), ("learned_range", "hybrid"),
                                           ("fixed_small", "vlb"), ("learned_range", "vlb")],
                         ids=lambda v: "-".join(v))  # fmt: skip
def test_every_prediction_variance_and_loss_trains_on_the_label(prediction_type, variance_loss):
    """The loss of a labelled batch reaches the class embeddings of exactly the labels used; with a learned
    variance the bound term (hybrid/VLB) is conditioned on the label too."""
    from ddpm_hub.losses import training_losses

    variance, loss_type = variance_loss
    scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type, variance_type=variance)
    unet = _unet(learned=variance.startswith("learned")).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 50, (6,), generator=g)
    labels = torch.tensor([0, 2, 0, 2, 3, 3])  # class 1 unused; 3 is the null label
    x_t = scheduler.add_noise(x0, noise, t)
    losses = training_losses(scheduler, unet(x_t, t, class_labels=labels).sample, x0, noise, t, loss_type,
                             x_t=x_t)  # fmt: skip
    key = "vb" if loss_type == "hybrid" else "loss"  # hybrid: the bound term alone must see the label as well
    losses[key].mean().backward()
    grad = unet.class_embedding.weight.grad.abs().sum(dim=1)
    assert (grad[[0, 2, 3]] > 0).all() and grad[1] == 0


# -- Guided sampling ---------------------------------------------------------------------------------------------------


def _count_unet_calls(pipeline):
    batches = []
    handle = pipeline.unet.register_forward_hook(lambda m, args, kwargs_out: batches.append(args[0].shape[0]))
    return batches, handle


def test_class_labels_as_int_list_tensor_or_names_and_one_unet_call_per_step():
    pipeline = _pipeline()
    reference = _images(pipeline, class_labels=[1, 1], guidance_scale=2.0)
    for form in (1, "b", ["b", 1], torch.tensor([1, 1]), torch.tensor(1)):
        np.testing.assert_array_equal(_images(pipeline, batch_size=2, class_labels=form, guidance_scale=2.0),
                                      reference, err_msg=repr(form))  # fmt: skip
    assert pipeline.get_label_ids(["c", "a"]) == [2, 0]
    batches, handle = _count_unet_calls(pipeline)
    try:
        _images(pipeline, class_labels=[0, 1, 2], guidance_scale=3.0)
        assert batches == [6] * 5  # one UNet call of batch 2B per step
        batches.clear()
        _images(pipeline, class_labels=[0, 1, 2], guidance_scale=1.0)
        assert batches == [3] * 5  # scale 1: the conditional pass only
    finally:
        handle.remove()


def test_guidance_scale_0_and_1_are_the_unconditional_and_conditional_models():
    """Scale 0 is the null-label model and scale 1 the conditional one: checked against single-label runs."""
    pipeline = _pipeline()
    null = _images(pipeline, batch_size=2)  # no labels: the null label, unguided
    np.testing.assert_allclose(_images(pipeline, class_labels=[0, 2], guidance_scale=0.0), null, atol=1e-5)
    conditional = _images(pipeline, class_labels=[0, 2])
    assert np.abs(conditional - null).max() > 1e-3  # the label changes the image


def test_per_image_generators_and_callback_with_guidance():
    pipeline = _pipeline(learned=True)
    together = pipeline(class_labels=[0, 2], guidance_scale=2.5, num_inference_steps=5, output_type="np",
                        generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images  # fmt: skip
    alone = pipeline(class_labels=[2], guidance_scale=2.5, num_inference_steps=5, output_type="np",
                     generator=[torch.Generator().manual_seed(8)]).images  # fmt: skip
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)  # image i depends on its generator only
    shapes = []

    def callback(pipe, i, t, kwargs):
        shapes.append((tuple(kwargs["latents"].shape), tuple(kwargs["model_output"].shape)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 4 else {}

    out = pipeline(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=5, output_type="np",
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "model_output"])
    assert shapes == [((2, 1, 8, 8), (2, 2, 8, 8))] * 5  # B, not 2B: the guided output, variance channels kept
    np.testing.assert_array_equal(out.images, np.full_like(out.images, 0.5))


def test_label_misuse_is_a_one_line_error_naming_what_is_allowed():
    unconditional = DDPMPipeline(unet=_unet(num_classes=None), scheduler=DDPMScheduler(num_train_timesteps=10))
    cases = [
        (unconditional, {"class_labels": 1}, "unconditional"),
        (unconditional, {"guidance_scale": 3.0}, "unconditional"),
        (_pipeline(cond_drop_prob=0.0), {}, "no unconditional mode: pass class_labels"),
        (_pipeline(cond_drop_prob=0.0), {"class_labels": 1, "guidance_scale": 2.0}, "guidance_scale=1"),
        (_pipeline(), {"class_labels": "zebra"}, r"choose from \['a', 'b', 'c'\]"),
        (_pipeline(), {"class_labels": 3}, "class id 0..2"),
        (_pipeline(), {"class_labels": [0, 1], "batch_size": 3}, "2 class_labels for batch_size 3"),
        (_pipeline(), {"class_labels": torch.tensor([0.5])}, r"class label 0.5 is not a class id 0..2 \(an integer\)"),
        (_pipeline(), {"class_labels": 3.0}, r"class label 3.0 is not a class id 0..2 \(an integer\)"),
        (_pipeline(), {"class_labels": np.array([[0, 1]])}, r"1-d sequence of labels, got shape \(1, 2\)"),
        (_pipeline(), {"class_labels": []}, "empty"),
        (_pipeline(), {"class_labels": {0, 1}}, "must be ordered"),
        (_pipeline(), {"guidance_scale": 3.0}, "guidance_scale=3.0 needs class_labels"),
        (_pipeline(), {"class_labels": 1, "guidance_scale": float("nan")}, "finite number"),
    ]
    for pipeline, kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle) as exc:
            pipeline(num_inference_steps=2, **kwargs)
        assert "\n" not in str(exc.value), kwargs


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "3", None, True])
def test_a_non_finite_guidance_scale_is_refused_before_work(scale):
    torch.manual_seed(0)
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config({**create_unet("tiny").config, "num_class_embeds": 11})
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=10))

    def forbidden(*args, **kwargs):
        raise AssertionError("the UNet ran before guidance_scale was checked")

    pipeline.unet.forward = forbidden
    with pytest.raises(ValueError, match=r"^guidance_scale must be a finite number, got"):
        pipeline(class_labels=[3], guidance_scale=scale, num_inference_steps=2)


def test_guidance_scale_zero_is_unconditional_and_a_negative_one_is_refused(tmp_path, capsys):
    """0 is the issue's 'unconditional' end of the scale (the output is the null label's); below 0 is refused by
    the pipeline and the CLI in one line."""
    from ddpm_hub.cli import main

    pipeline = _pipeline()
    zero = _images(pipeline, class_labels=[0, 1], guidance_scale=0.0)
    null = _images(pipeline, class_labels=[2, 2], guidance_scale=1.0)  # not the null label: differs
    assert not np.allclose(zero, null)
    unconditional = _images(pipeline, batch_size=2)  # no labels: the null label
    np.testing.assert_allclose(zero, unconditional, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0") as exc:
        _images(pipeline, class_labels=[0], guidance_scale=-1.0)
    assert "\n" not in str(exc.value)
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path), "--class_labels", "a", "--guidance_scale", "-2"])
    assert "must be >= 0" in capsys.readouterr().err


def test_integer_labels_on_a_model_with_number_names_warn_and_names_do_not():
    """Data labelled 1, 2, 3 gives class ids 0, 1, 2 named '1', '2', '3': an integer is an id (DiTPipeline's
    convention), so a user who means a name is warned, at their own line; strings and the library's own id calls
    (sample_uint8, the bound) are silent, and so are models whose names equal their ids (the digits)."""
    import warnings

    from ddpm_hub.pipelines.pipeline_class_conditional import ClassIdWarning

    from ddpm_hub.sampling import sample_uint8

    shifted = _pipeline(id2label={0: "1", 1: "2", 2: "3"})
    with pytest.warns(ClassIdWarning, match=r"id 1 is the class named '2'.*class_labels=\['1'\]") as record:
        shifted(class_labels=1, num_inference_steps=2)
    assert record[0].filename == __file__
    with pytest.warns(ClassIdWarning, match=r"e\.g\. class_labels=\['1', '2'\]"):  # '0' is no name: real names
        shifted(class_labels=0, num_inference_steps=2)
    shifted(class_labels=["1", "2"], num_inference_steps=2)  # the suggestion works
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.warns(ClassIdWarning):
        shifted.bits_per_dim(images, class_labels=[0, 2], estimate=True, num_samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassIdWarning)
        shifted(class_labels=["1", "3"], num_inference_steps=2)  # names: what the user means
        sample_uint8(shifted, 2, 2, class_labels=torch.tensor([0, 2]))  # ids by construction
        _pipeline(id2label={0: "0", 1: "1", 2: "2"})(class_labels=[1, 2], num_inference_steps=2)  # ids are names
        _pipeline()(class_labels=[1, 2], num_inference_steps=2)  # names are not numbers
    assert shifted.get_label_ids([" 2", "3 "]) == [1, 2]
    with pytest.raises(ValueError, match="bits_per_dim takes no guidance_scale"):
        shifted.bits_per_dim(images, class_labels=["1", "2"], guidance_scale=2.0)


def test_numpy_labels_are_the_same_labels():
    """`digits.target`-style NumPy arrays and NumPy integers work as lists and ints do (the same images)."""
    pipeline = _pipeline()

    def sample(labels):
        return pipeline(class_labels=labels, guidance_scale=2.0, num_inference_steps=3, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    reference = sample([2, 0, 1])
    for labels in (np.array([2, 0, 1]), np.array([2, 0, 1], dtype=np.int32), [np.int64(2), np.int64(0), 1],
                   torch.tensor([2, 0, 1]), ("c", "a", "b")):  # fmt: skip
        np.testing.assert_array_equal(sample(labels), reference)
    single = pipeline(class_labels=np.int64(1), batch_size=2, num_inference_steps=3, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    np.testing.assert_array_equal(single, pipeline(class_labels=1, batch_size=2, num_inference_steps=3,
                                                   output_type="np", generator=torch.Generator().manual_seed(0)).images)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="got 1 class_labels for 3 images: bits_per_dim takes one label per image"):
        pipeline.bits_per_dim(images, class_labels=1)
    with pytest.raises(ValueError, match="got 2 class_labels for 3 images: bits_per_dim takes one label per image"):
        pipeline.bits_per_dim(images, class_labels=[0, 1])


# -- The bound given the label, and without it -------------------------------------------------------------------------


def test_bits_per_dim_given_labels_and_unconditional_match_an_oracle():
    from ddpm_hub.likelihood import bits_per_dim

    scheduler = DDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    pipeline = DDPMPipeline(unet=_unet(learned=True), scheduler=scheduler, id2label={0: "a", 1: "b", 2: "c"})
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    noise = torch.randn(10, *images.shape, generator=g)
    unet = pipeline.unet

    def oracle(y):  # two plain UNet calls with explicit labels, batch by batch
        return lambda x, t: unet(x, t, class_labels=y).sample

    common = {"noise": noise, "batch_size": 8, "progress": False}
    expected_cond = bits_per_dim(oracle(labels), scheduler, images, **common).total
    expected_null = bits_per_dim(oracle(torch.full((5,), 3)), scheduler, images, **common).total
    conditional = pipeline.bits_per_dim(images, class_labels=["a", "b", "c", "b", "a"], **common).total
    unconditional = pipeline.bits_per_dim(images, **common).total
    torch.testing.assert_close(conditional, expected_cond, rtol=0, atol=1e-9)
    torch.testing.assert_close(unconditional, expected_null, rtol=0, atol=1e-9)
    assert (conditional - unconditional).abs().max() > 1e-4
    # batched into pieces, each piece gets its own labels
    pieces = pipeline.bits_per_dim(images, class_labels=labels, noise=noise, batch_size=2, progress=False).total
    torch.testing.assert_close(pieces, expected_cond, rtol=1e-6, atol=0)  # other batch shapes: float rounding
    with pytest.raises(ValueError, match="bits_per_dim takes one label per image"):
        pipeline.bits_per_dim(images, class_labels=1)


# -- Sharing: stock diffusers with the repo's pipeline.py, from a folder and from the Hub ------------------------------


# What the step-end callback of the stock comparison does, defined once for both processes: it records the channels
# of the model output the scheduler got and moves x_t by the model output after step 1 (so the images depend on it).
STOCK_SETUP = """
def step_end(pipe, i, t, tensors):
    latents, model_output = tensors["latents"], tensors["model_output"]
    RECORD.setdefault("channels", []).append(model_output.shape[1])
    return {"latents": latents - 0.1 * model_output[:, : latents.shape[1]]} if i == 1 else {}
"""


GUIDED = {"class_labels": ["c", 0], "guidance_scale": 2.5, "num_inference_steps": 4, "output_type": "np"}


GUIDED_WITH_CALLBACK = {**GUIDED, "callback_on_step_end": "step_end",
                        "callback_on_step_end_tensor_inputs": ["latents", "model_output"]}  # fmt: skip


VARIANCES = {"fixed": "fixed_small", "learned_range": "learned_range"}


def _scheduler_cases():
    import diffusers

    for variance in VARIANCES:
        for name in diffusers.DDPMScheduler._compatibles:
            if name != "EDMEulerScheduler":  # refused by the loop: tests/test_pipeline.py
                yield pytest.param(name, variance, id=f"{name}-{variance}")


@pytest.fixture(scope="module")
def stock_samples(tmp_path_factory, _hub_server):
    """A conditional pipeline folder for every scheduler of `DDPMScheduler._compatibles`, fixed and learned variance,
    and one pushed to the Hub, each sampled (guided, with a step-end callback) by stock diffusers with the folder's
    pipeline.py in one subprocess: (folders, stock results, the Hub repo's files)."""
    import diffusers

    tmp_path = tmp_path_factory.mktemp("stock")
    folders, cases = {}, {}
    for param in _scheduler_cases():
        name, variance = param.values
        config = DDPMScheduler(num_train_timesteps=100, variance_type=VARIANCES[variance]).config
        extra = {"noise_sampler_seed": 0} if name == "DPMSolverSDEScheduler" else {}  # its own Brownian noise seed
        scheduler = getattr(diffusers, name).from_config(config, **extra)
        folders[param.id] = tmp_path / param.id
        _pipeline(learned=variance != "fixed", scheduler=scheduler).save_pretrained(folders[param.id])
        cases[param.id] = (str(folders[param.id]), GUIDED_WITH_CALLBACK)
    _hub_server.reset()
    _hub_server.state.token = FAKE_TOKEN
    try:
        _pipeline(learned=True).push_to_hub("org/conditional", token=FAKE_TOKEN)
        cases["hub"] = ("org/conditional", GUIDED)
        stock = stock_diffusers_images(cases, tmp_path, load={"custom_pipeline": "pipeline", "trust_remote_code": True},
                                       setup=STOCK_SETUP, HF_TOKEN=FAKE_TOKEN, HF_HUB_OFFLINE="0")  # fmt: skip
        return folders, stock, dict(_hub_server.state.repos["org/conditional"].head[1])
    finally:
        _hub_server.reset()


@pytest.mark.parametrize("name,variance", list(_scheduler_cases()))
def test_stock_diffusers_samples_a_saved_conditional_folder_as_ours(stock_samples, name, variance):
    """Stock diffusers, with the folder's pipeline.py (our denoising loop) and without ddpm_hub, gives ddpm_hub's
    images bit for bit, guided and with a step-end callback that changes x_t, for every compatible scheduler;
    its callback saw the channels ours saw (2C for a learned-variance DDPM scheduler only)."""
    folders, stock, _ = stock_samples
    key = f"{name}-{variance}"
    assert str(stock[key + "_pipeline"]).endswith(".ClassConditionalDDPMPipeline")
    assert str(stock[key + "_scheduler"]) == name
    namespace = {"RECORD": {}}
    exec(STOCK_SETUP, namespace)
    pipeline = DDPMPipeline.from_pretrained(folders[key])
    pipeline.set_progress_bar_config(disable=True)
    ours = pipeline(**pipeline_call_kwargs(GUIDED_WITH_CALLBACK, namespace)).images
    np.testing.assert_array_equal(stock[key], ours)
    channels = 2 if name == "DDPMScheduler" and variance != "fixed" else 1
    steps = len(pipeline.scheduler.timesteps)  # 4, or more for PNDM's Runge-Kutta and Heun's, KDPM2's two stages
    assert stock[key + "_channels"].tolist() == namespace["RECORD"]["channels"] == [channels] * steps


def test_stock_diffusers_samples_a_conditional_hub_repo_as_ours(stock_samples):
    _, stock, files = stock_samples
    assert "pipeline.py" in files and str(stock["hub_pipeline"]).endswith(".ClassConditionalDDPMPipeline")
    source = REPO / "pipelines" / "pipeline_class_conditional.py"
    assert files["pipeline.py"].decode() == source.read_text()  # the file DDPMPipeline's loop is defined in
    ours = _pipeline(learned=True)(**pipeline_call_kwargs(GUIDED, {})).images
    np.testing.assert_array_equal(stock["hub"], ours)
    card = files["README.md"].decode()
    assert 'from_pretrained("org/conditional", custom_pipeline="pipeline", trust_remote_code=True)' in card


# -- Command line ------------------------------------------------------------------------------------------------------


def test_cli_repeated_classes_keep_every_file_and_the_default_scale_is_the_recommended_one(
    trained_conditional, tmp_path, capsys
):
    from ddpm_hub.cli import main

    out_dir = tmp_path / "samples"
    assert main(["sample", "--model", str(trained_conditional), "--class_labels", "3", " 3", "--num_images", "2",
                 "--steps", "2", "--out_dir", str(out_dir)]) == 0  # fmt: skip
    assert sorted(p.name for p in out_dir.glob("*.png")) == [f"3_{i:04d}.png" for i in range(4)]  # none overwritten
    assert "guidance scale 2 (the model's recommended scale)" in capsys.readouterr().out
    index = json.loads((trained_conditional / "model_index.json").read_text())
    assert index["recommended_guidance_scale"] == 2.0  # what the card recommends, stored for the CLI
    assert main(["evaluate", "--model", str(trained_conditional), "--digits_fid", "--num_images", "8", "--steps",
                 "2", "--out", str(tmp_path / "e.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e.json").read_text())["guidance_scale"] == 2.0
    assert main(["evaluate", "--model", str(trained_conditional), "--digits_fid", "--num_images", "8", "--steps",
                 "2", "--guidance_scale", "1", "--out", str(tmp_path / "e1.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "e1.json").read_text())["guidance_scale"] == 1.0


def test_cli_sample_out_dir_never_mixes_two_runs(trained_conditional, tmp_path, capsys):
    from ddpm_hub.cli import main

    out_dir = tmp_path / "samples"
    argv = ["sample", "--model", str(trained_conditional), "--class_labels", "3", "--num_images", "1", "--steps", "2",
            "--out_dir", str(out_dir)]  # fmt: skip
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert main([*argv, "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --out_dir") and "already holds samples (3_0000.png, samples.npz)" in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # nothing overwritten


def test_cli_messages_for_a_model_without_label_dropout_and_the_default_dataset(tmp_path, capsys):
    from ddpm_hub.cli import main
    from ddpm_hub.hub import render_model_card

    folder = tmp_path / "no-dropout"
    _pipeline(cond_drop_prob=0.0).save_pretrained(folder)  # classes a, b, c; no unconditional mode
    for argv, needle in (
        (["sample", "--model", str(folder), "--steps", "2"], "no unconditional mode: pass --class_labels (choose "
         "from ['a', 'b', 'c'])"),
        (["sample", "--model", str(folder), "--class_labels", "a", "--guidance_scale", "2", "--steps", "2"],
         "trained without label dropout"),
        (["evaluate", "--model", str(folder), "--bpd_estimate", "--num_images", "4"], "is not one of the 3 classes "
         "of this model ['a', 'b', 'c']"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and needle in err, err
    assert "(evaluate used --dataset digits, the default: pass --dataset" in err
    card = str(render_model_card(hparams={"resolution": 8, "cond_drop_prob": 0.0}, metrics={}, repo_id="org/m",
                                 num_parameters=1, channels=1, dataset_id=None, dataset_description="d",
                                 class_names=["a", "b"], guidance_scale=1.0))  # fmt: skip
    card = " ".join(card.split())
    assert "given each row's class (the model takes no guidance)" in card and "Recommended" not in card


def test_cli_class_tokens_are_names_first_and_numbers_never_mean_two_classes():
    from ddpm_hub.cli import UserError, class_ids

    letters = _pipeline()  # names a, b, c: numbers are ids
    assert class_ids(letters, ["b", "2", " c", "0"]) == [1, 2, 2, 0]
    for token, needle in (("03", "ids 0..2"), ("3", "ids 0..2"), ("-1", "ids 0..2"), ("zebra", "'a', 'b', 'c'")):
        with pytest.raises(UserError, match=needle):
            class_ids(letters, [token])
    numbers = _pipeline(id2label={0: "1", 1: "3", 2: "7"})  # names are numbers: a number is always a name
    assert class_ids(numbers, ["1", "7", "3"]) == [0, 2, 1]
    for token in ("0", "2"):  # valid ids, but not names: refused rather than read as a second meaning
        with pytest.raises(UserError, match="numbers are names"):
            class_ids(numbers, [token])


def test_cli_samples_classes_by_name_or_id_and_evaluates_both_bounds(trained_conditional, trained, tmp_path,
                                                                      capsys):  # fmt: skip
    from ddpm_hub.cli import main

    out_dir = tmp_path / "samples"
    code = main(["sample", "--model", str(trained_conditional), "--class_labels", "3", "7", "--guidance_scale", "3",
                 "--num_images", "2", "--steps", "3", "--out_dir", str(out_dir), "--out", str(tmp_path / "g.png")])
    assert code == 0
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["3_0000.png", "3_0001.png", "7_0000.png", "7_0001.png"]
    assert np.load(out_dir / "samples.npz")["labels"].tolist() == [3, 3, 7, 7]
    assert np.load(out_dir / "samples.npz")["class_names"].tolist() == [str(i) for i in range(10)]  # by id
    assert Image.open(tmp_path / "g.png").size == (2 * 66 + 2, 2 * 66 + 2)  # one row per class
    capsys.readouterr()
    code = main(["evaluate", "--model", str(trained_conditional), "--bpd_estimate", "--num_images", "12",
                 "--scheduler", "ddim", "--steps", "3", "--out", str(tmp_path / "r.json")])  # the old flag name
    assert code == 0 and "--scheduler is deprecated; use --sampler" in capsys.readouterr().err
    results = json.loads((tmp_path / "r.json").read_text())
    assert {"bits_per_dim_estimate", "unconditional_bits_per_dim_estimate"} <= set(results)
    for argv, needle in (
        (["sample", "--model", str(trained_conditional), "--class_labels", "zebra"], "is not a class of this model"),
        (["sample", "--model", str(trained), "--class_labels", "3"], "unconditional"),
        (["sample", "--model", str(trained), "--guidance_scale", "3"], "is for class-conditional models; this one "
         "is unconditional"),
        (["sample", "--model", str(trained_conditional), "--guidance_scale", "3"], "needs --class_labels"),
        (["sample", "--model", str(trained_conditional), "--class_labels", "12"], "numbers are names"),
        (["sample", "--model", str(trained_conditional), "--class_labels", "03"], "is not a class of this model"),
        (["evaluate", "--model", str(trained), "--bpd_estimate", "--guidance_scale", "2"], "this one is "
         "unconditional"),
    ):
        assert main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (after diffusers' loading bar)
        assert last.startswith("error: ") and needle in last, last
