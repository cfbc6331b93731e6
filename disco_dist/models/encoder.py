"""A sentence encoder: tokenizer + transformer + pooling + optional L2 normalisation.

Loads a hub id or a local folder (reading the sentence-transformers pooling, normalisation, prompt and
max-length config where present), can keep a subset of layers to make a smaller student, and saves a folder
that both `transformers.AutoModel` and `sentence_transformers.SentenceTransformer` load.

Encoders (BERT, MPNet, MiniLM) pool the mean or the first token; decoder embedders (Qwen3-Embedding,
gte-Qwen2, e5-mistral) pool the last real token, with left or right padding alike. A prompt is text put
before every sentence, as sentence-transformers does it: its tokens are part of the input, so attention
sees them and mean pooling averages over them too (`include_prompt: false` is refused, not ignored). A
Matryoshka `truncate_dim` keeps the first N dimensions, re-normalised when the encoder normalises.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .fetch import DEFAULT_CACHE, MODELS
from .layers import keep_layers
from .masks import attention_bias

POOLINGS = ("mean", "cls", "pooler", "lasttoken")
# sentence-transformers' pooling modes this project computes, by their names in 1_Pooling/config.json
ST_POOLINGS = {"mean": "mean", "cls": "cls", "lasttoken": "lasttoken"}


def resolve_model_path(name_or_path: str) -> str:
    """A local folder as is; a known model name (or its sentence-transformers/ hub id) from the fetch cache
    when fetched there; anything else is passed on to transformers as a hub id."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {name_or_path} is a file; pass the model's folder")
        return str(path)
    short = name_or_path.split("/")[-1]
    if short in MODELS and (DEFAULT_CACHE / MODELS[short].folder / "model.safetensors").exists():
        return str(DEFAULT_CACHE / MODELS[short].folder)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise UserError(
            f"model folder {name_or_path} does not exist; fetch the real models with "
            "`python launchers/fetch_models.py` or pass an existing folder"
        )
    if not _in_hub_cache(name_or_path) and not _hub_reachable():
        raise UserError(
            f"model {name_or_path} is not a local folder, a fetched model or in the Hugging Face cache, "
            "and the hub cannot be reached (offline); fetch it with `python launchers/fetch_models.py` "
            "or pass a local folder"
        )
    return name_or_path


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One short connection attempt, instead of transformers' minute of retries that ends in a traceback."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _pooling_mode(config: dict, where: Path) -> str:
    """The one pooling a 1_Pooling/config.json asks for, in either of sentence-transformers' formats."""
    modes = config.get("pooling_mode")
    if modes is None:  # the older format: one boolean per mode
        names = {
            "pooling_mode_cls_token": "cls",
            "pooling_mode_mean_tokens": "mean",
            "pooling_mode_lasttoken": "lasttoken",
            "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens": "weightedmean",
        }
        modes = [name for key, name in names.items() if config.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in ST_POOLINGS:
        raise UserError(
            f"{where} asks for pooling {modes}; disco-dist computes one of {', '.join(ST_POOLINGS)} "
            "(pass --pooling to choose one, if the model was trained for it)"
        )
    if config.get("include_prompt", True) is False:
        raise UserError(
            f"{where} sets include_prompt false (prompt tokens left out of the pooling), which "
            "disco-dist does not do; its pooling always includes the prompt's tokens"
        )
    return ST_POOLINGS[modes[0]]


def sentence_transformers_settings(folder: Path) -> dict:
    """Pooling, normalisation, max length and default prompt recorded in a sentence-transformers folder
    (empty if none). A module this project does not compute (e.g. a Dense layer or a latent-attention
    pooling) is refused in one line rather than skipped."""
    settings = {}
    modules = _read_json(folder / "modules.json")
    if modules is not None:
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        unknown = [kind for kind in kinds if kind not in ("Transformer", "Pooling", "Dense", "Normalize")]
        if unknown or kinds.count("Dense") > 1:
            raise UserError(
                f"{folder}/modules.json has module(s) {', '.join(unknown or kinds)}, which disco-dist does not "
                "compute (it reads Transformer, Pooling, one linear Dense and Normalize)"
            )
        settings["normalize"] = "Normalize" in kinds
        dense = [m for m in modules if m.get("type", "").endswith("Dense")]
        if dense:
            settings["dense"] = folder / dense[0]["path"]
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    if pooling:
        settings["pooling"] = _pooling_mode(pooling, folder / "1_Pooling" / "config.json")
    st_config = _read_json(folder / "config_sentence_transformers.json") or {}
    prompt_name = st_config.get("default_prompt_name")
    if prompt_name:
        prompts = st_config.get("prompts") or {}
        if prompt_name not in prompts:
            raise UserError(
                f"{folder}/config_sentence_transformers.json: default_prompt_name {prompt_name!r} is not "
                f"among its prompts ({', '.join(prompts) or 'none'})"
            )
        settings["prompt"] = prompts[prompt_name]
    bert_config = _read_json(folder / "sentence_bert_config.json")
    if bert_config and bert_config.get("max_seq_length"):
        settings["max_length"] = int(bert_config["max_seq_length"])
    ours = _read_json(folder / "disco_dist.json")  # written by Encoder.save; says "pooler" where ST cannot
    if ours:
        settings.update({k: ours[k] for k in ("pooling", "normalize", "max_length", "prompt") if k in ours})
    return settings


class Encoder(nn.Module):
    def __init__(
        self, model, tokenizer, pooling="mean", normalize=True, max_length=128, prompt="", truncate_dim=None, dense=None
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if dense is not None and dense.in_features != model.config.hidden_size:
            raise UserError(
                f"a Dense head of {dense.in_features} inputs on a model {model.config.hidden_size} wide; "
                "the folder's head belongs to another model"
            )
        width = dense.out_features if dense is not None else model.config.hidden_size
        if truncate_dim is not None and not 0 < truncate_dim <= width:
            raise UserError(f"a truncation to {truncate_dim} dimensions: the model's embeddings have {width}")
        if tokenizer.pad_token is None:  # decoder tokenizers often have none; any token does under the mask
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, int(max_length)
        self.prompt, self.truncate_dim = prompt or "", truncate_dim
        self.unpadded = False  # dense layers on real tokens only (unpadded.py); the student's training turns it on
        self.dense = dense  # a projection head after the pooling (a sentence-transformers Dense), or None

    @property
    def dim(self) -> int:
        """The width of the embeddings this encoder returns (after its head and truncation, if any)."""
        return self.truncate_dim or (self.dense.out_features if self.dense is not None else self.width)

    @property
    def width(self) -> int:
        """The width of the pooled transformer output (what a head maps from)."""
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        pooling=None,
        normalize=None,
        max_length=None,
        keep=None,
        model_loader=None,
        prompt=None,
        truncate_dim=None,
        head=True,
    ):
        """`model_loader(path)` replaces `AutoModel.from_pretrained` (the ZeRO-3 teacher uses it). `prompt`: None
        takes the folder's default prompt (sentence-transformers' `default_prompt_name`), "" none. `head`: False
        leaves out a Dense head the folder has (the encoder's own pooled output)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from .dense import read_dense

        transformers_logging.disable_progress_bar()  # one bar per rank per load is noise in a training log
        path = resolve_model_path(str(name_or_path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = (model_loader or AutoModel.from_pretrained)(path)
        except OSError as err:
            raise UserError(
                f"could not load model {name_or_path!r}: {str(err).splitlines()[0]} (offline? pass a "
                "local folder, e.g. one made by `python launchers/fetch_models.py`)"
            ) from None
        settings = sentence_transformers_settings(Path(path)) if Path(path).is_dir() else {}
        if keep:
            keep_layers(model, list(keep))
        tokenizer_max = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 512
        return cls(
            model,
            tokenizer,
            pooling=pooling or settings.get("pooling", "mean"),
            normalize=settings.get("normalize", True) if normalize is None else normalize,
            # a requested length beyond what the model's positions cover is capped there
            max_length=min(max_length or settings.get("max_length", tokenizer_max), tokenizer_max),
            prompt=settings.get("prompt", "") if prompt is None else prompt,
            truncate_dim=truncate_dim,
            dense=read_dense(settings["dense"]) if head and "dense" in settings else None,
        )

    def tokenize(self, sentences):
        """Token ids of the prompt + each sentence (sentence-transformers' order), padded as the tokenizer says."""
        return self.tokenizer(
            [self.prompt + s for s in sentences],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def token_counts(self, sentences) -> list:
        """Tokens of the prompt + each sentence, after truncation: what a batch pads to."""
        ids = self.tokenizer([self.prompt + s for s in sentences], truncation=True, max_length=self.max_length)
        return [len(i) for i in ids["input_ids"]]

    def length_order(self, sentences, lengths: list | None = None) -> list:
        """Indices of `sentences`, shortest first by token count (what padding follows; `lengths`: their
        `token_counts` where already known). Sorting by characters instead left 24% of a teacher batch of 16 as
        padding on Wikipedia sentences (under 1% this way)."""
        lengths = self.token_counts(sentences) if lengths is None else lengths
        return sorted(range(len(sentences)), key=lengths.__getitem__)

    def pool(self, outputs, attention_mask):
        if self.pooling == "cls":
            return outputs.last_hidden_state[:, 0]
        if self.pooling == "pooler":
            return outputs.pooler_output
        if self.pooling == "lasttoken":  # the last real token of each row, whichever side the padding is on
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.to(positions.dtype) * positions).argmax(dim=1)
            return outputs.last_hidden_state[torch.arange(len(last), device=last.device), last]
        mask = attention_mask.unsqueeze(-1).to(outputs.last_hidden_state.dtype)
        return (outputs.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids, attention_mask, normalize=None, token_index=None):
        """Pooled embeddings, normalised if this encoder normalises (or as `normalize` says). `token_index`: the
        flat positions of the real tokens (`masks.token_index(attention_mask)`, computed where the mask was made,
        on the host), for the padding-free forward; without it that forward finds them on the device."""
        if self.unpadded:
            from . import unpadded

            outputs = unpadded.forward(self.model, input_ids, attention_mask, token_index)
        else:
            causal = self.pooling == "lasttoken"
            outputs = self.model(input_ids=input_ids, attention_mask=attention_bias(self.model, attention_mask, causal))
        embeddings = self.pool(outputs, attention_mask)
        if self.dense is not None:
            embeddings = self.dense(embeddings)
        if self.truncate_dim:
            embeddings = embeddings[:, : self.truncate_dim]
        return F.normalize(embeddings, dim=-1) if (self.normalize if normalize is None else normalize) else embeddings

    @torch.inference_mode()
    def encode(self, sentences, batch_size=64, progress=False, device=None, normalize=None) -> torch.Tensor:
        """Embeddings of `sentences` in their order, as float32 on the CPU; in eval mode (no dropout), which
        is restored afterwards. Batches are formed from sentences sorted by token count: little compute is padding."""
        device = device or next(self.model.parameters()).device
        order = self.length_order(sentences)[::-1]
        out = torch.empty(len(sentences), self.dim)
        batches = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encoding", unit="batch", leave=False)
        was_training = self.training
        self.eval()
        try:
            for start in batches:
                index = order[start : start + batch_size]
                batch = self.tokenize([sentences[i] for i in index]).to(device)
                out[index] = self(batch["input_ids"], batch["attention_mask"], normalize=normalize).float().cpu()
        finally:
            self.train(was_training)
        return out

    def save(self, folder, head=None) -> Path:
        """Write a folder that AutoModel and SentenceTransformer both load (atomically: a temporary folder
        beside it, renamed into place; an existing folder of the same name is replaced only then). `head`: a
        linear layer saved as the Dense module in place of the encoder's own (`self.dense`)."""
        folder = Path(folder)
        head = self.dense if head is None else head
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            self._write_sentence_transformers_files(tmp, head)
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _write_sentence_transformers_files(self, folder: Path, head) -> None:
        from .dense import write_dense

        kinds = ["Transformer", "Pooling"] + (["Dense"] if head is not None else []) + (["Normalize"] * self.normalize)
        modules = [
            {
                "idx": i,
                "name": str(i),
                "path": "" if i == 0 else f"{i}_{kind}",
                "type": f"sentence_transformers.models.{kind}",
            }
            for i, kind in enumerate(kinds)
        ]
        for module in modules[1:]:
            (folder / module["path"]).mkdir()
        if head is not None:
            write_dense(head, folder / modules[2]["path"])
        # sentence-transformers has no "pooler output" mode: it gets [CLS] there, and disco_dist.json keeps the truth
        pooling = {
            "word_embedding_dimension": self.width,
            "pooling_mode_cls_token": self.pooling in ("cls", "pooler"),
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "lasttoken",
        }
        files = {
            "modules.json": modules,
            "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "config_sentence_transformers.json": {
                "similarity_fn_name": "cosine",
                **({"prompts": {"default": self.prompt}, "default_prompt_name": "default"} if self.prompt else {}),
            },
            "disco_dist.json": {
                "pooling": self.pooling,
                "normalize": self.normalize,
                "max_length": self.max_length,
                **({"prompt": self.prompt} if self.prompt else {}),
            },
        }
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2) + "\n")
