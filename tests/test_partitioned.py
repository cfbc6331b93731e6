"""A ZeRO-3 teacher's partitions, read rank by rank from the checkpoint (the embeddings they give are checked
against sentence-transformers in test_decoder_teacher.py, on 2 and 3 ranks)."""

import torch


def test_every_parameter_of_a_decoder_and_an_encoder_is_found_in_its_checkpoint(tmp_path):
    """Each ZeRO-3 rank reads its own elements straight from the safetensors files (no fallback to rank 0 reading
    everything), and those elements are the checkpoint's."""
    from conftest import build_tiny_decoder, build_tiny_model
    from transformers import AutoModel

    from disco_dist.models.partitioned import Checkpoint

    for folder in (build_tiny_decoder(tmp_path / "decoder"), build_tiny_model(tmp_path / "encoder")):
        model, checkpoint = AutoModel.from_pretrained(folder), Checkpoint(folder)
        for name, param in model.named_parameters():
            key = checkpoint.key_for(name, model.base_model_prefix)
            assert key is not None, name
            flat = param.detach().reshape(-1)
            torch.testing.assert_close(checkpoint.read(key, 3, 11), flat[3:11], rtol=0, atol=0)
