"""The README's Python API example runs as written (with a tiny model and an .npz)."""

import torch

from conftest import tiny_model


def test_readme_api_example(tmp_path, data_file):
    from diffunlearn import (
        Status,
        TrainerConfig,
        load_data,
        load_model,
        make_method,
        resolve_forget,
        save_model,
        split_kept,
        unlearn,
        verify,
    )

    save_model(tiny_model(), tmp_path / "ddpm")
    model = load_model(tmp_path / "ddpm")
    data = load_data(str(data_file))
    kept, forget = split_kept(data, resolve_forget("img-03", data))
    assert len(kept) == 29 and torch.equal(forget[0], data.images[3])
    logs = []
    new = unlearn(model, kept, forget, make_method("siss", lam=0.5, scaling_norm=5.0),
                  TrainerConfig(steps=2, lr=5e-5, batch_size=4), log=logs.append)
    save_model(new, tmp_path / "out" / "model")
    assert [r["step"] for r in logs] == [1, 2]
    assert load_model(tmp_path / "out" / "model").sample_shape == (1, 8, 8)
    result = verify(new, data, resolve_forget("img-03", data), before=model)  # to_dict(): verification.json
    assert result.ok and set(result.record["models"]) >= {"before", "after"}
    assert result.overall.status in set(Status) and result.verdict("generation").figures["fresh"]["n"] > 0
    from diffunlearn import UntilRemoved

    loop = UntilRemoved(model, data, resolve_forget("img-03", data), check_every=2, gate_seeds=1)
    again = unlearn(model, kept, forget, make_method("siss", lam=0.5, scaling_norm=5.0),
                    TrainerConfig(steps=2, lr=5e-5, batch_size=4), callback=loop)
    # a random model never showed A, so nothing can be shown removed: the loop ran every step and says so
    assert [c["step"] for c in loop.checks] == [2] and loop.outcome == "not removed"
    assert loop.summary()["exit_status"] == 3 and "not removed within the step budget" in loop.line()
    assert torch.equal(again.unet.conv_in.weight, new.unet.conv_in.weight)  # the same 2 steps, whatever the loop
