"""Training slices for SAM / HQ-SAM: one windowed slice, its box prompts and a target mask per prompt.

An item is everything the decoder step needs for one slice, already in SAM's
frame (see :mod:`flaresam.models.sam.preprocess`): the slice resized and padded to
S x S (uint8, normalised later on the device), its jittered box prompts in
frame coordinates, and one soft target per prompt at the decoder's 256 x 256
output. When the embedding cache holds the slice, the item carries the cached
embedding instead of the image, so a DataLoader worker reads it from disk in
parallel with the step.

Only slices with at least one promptable organ are indexed: a slice without a
box gives SAM nothing to learn from.

Jitter is drawn from ``(seed, epoch, item)``: the same run repeats exactly, a
new epoch (:meth:`SamSliceDataset.set_epoch`) draws new boxes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flaresam.data.prompts import MAX_TRAINING_CLICKS, PromptConfig, SlicePrompts, jitter_boxes, slice_prompts
from flaresam.errors import DataError
from flaresam.models.sam.archs import SAM_PREPROCESSING, Preprocessing
from flaresam.models.sam.embedding_cache import slice_key
from flaresam.models.sam.preprocess import boxes_to_frame, lowres_hw, lowres_targets, preprocess_shape, resize_slices

if TYPE_CHECKING:
    from flaresam.data.store import PreparedStore


class SamSliceDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        store: PreparedStore,
        case_ids: list[str],
        *,
        image_size: int,
        lowres: int,
        prompts: PromptConfig = PromptConfig(),
        seed: int = 0,
        cache: Any = None,
        need_interm: bool = True,
        click_share: float = 0.0,
        preprocessing: Preprocessing = SAM_PREPROCESSING,
    ) -> None:
        self.store = store
        self.preprocessing = preprocessing
        self.case_ids = list(case_ids)
        self.image_size, self.lowres = image_size, lowres
        self.prompts, self.seed = prompts, int(seed)
        self.cache, self.need_interm = cache, need_interm
        self.click_share = float(click_share)
        self.epoch = 0
        index = []
        for ci, cid in enumerate(self.case_ids):
            pixels = np.load(store.case_dir(cid) / "pixels.npy")
            zs = np.flatnonzero((pixels >= prompts.min_pixels).any(axis=1))
            index.append(np.stack([np.full_like(zs, ci), zs], axis=1))
        self.index = np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)
        if len(self.index) == 0:
            raise DataError(
                f"{store.root}: no training slice has an organ of at least {prompts.min_pixels} pixels "
                f"in the {len(self.case_ids)} training cases"
            )
        self._cases: dict[int, Any] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _case(self, ci: int) -> Any:
        case = self._cases.get(ci)
        if case is None:
            case = self._cases[ci] = self.store.load_case(self.case_ids[ci])
        return case

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the memory maps themselves
        state = dict(self.__dict__)
        state["_cases"] = {}
        return state

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, z = (int(v) for v in self.index[i])
        case = self._case(ci)
        image = np.asarray(case.image[z])
        h, w = image.shape
        prompts = slice_prompts(np.asarray(case.label[z]), self.prompts, case.boxes[z], case.pixels[z])
        input_hw = preprocess_shape(h, w, self.image_size)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if 0 < self.prompts.per_slice < len(prompts):  # drawn first; without a cap no draw, the stream as before
            keep = np.sort(rng.choice(len(prompts), self.prompts.per_slice, replace=False))
            prompts = SlicePrompts(prompts.organs[keep], prompts.boxes[keep], prompts.masks[keep])
        frame_boxes = boxes_to_frame(prompts.boxes, (h, w), input_hw, self.preprocessing.box_rounding)
        boxes = jitter_boxes(frame_boxes, self.prompts.jitter_px, rng, input_hw, self.image_size)
        targets = lowres_targets(torch.from_numpy(prompts.masks), input_hw, self.image_size, self.lowres)
        clicks, click_seed = 0, 0
        if self.click_share > 0 and rng.random() < self.click_share:  # drawn after the jitter: boxes stay as without
            clicks = int(rng.integers(1, MAX_TRAINING_CLICKS + 1))
            click_seed = int(rng.integers(2**62))

        item: dict[str, Any] = {
            "case": self.case_ids[ci],
            "z": z,
            "input_hw": input_hw,
            "lowres_hw": lowres_hw(input_hw, self.image_size, self.lowres),
            "boxes": torch.from_numpy(boxes),
            "organs": torch.from_numpy(prompts.organs),
            "targets": targets.to(torch.float16),
            "clicks": clicks,  # corrective-click rounds in training (flaresam.models.sam.training_clicks), 0: box only
            "click_seed": click_seed,
            "slice_key": None,
            "image": None,
            "embedding": None,
            "interm": None,
        }
        if self.cache is not None:
            item["slice_key"] = key = slice_key(image)
            hit = self.cache.load(key, interm=self.need_interm)
            if hit is not None:
                item["embedding"] = torch.from_numpy(hit[0])
                item["interm"] = None if hit[1] is None else torch.from_numpy(hit[1])
                return item
        item["image"] = resize_slices(np.asarray(image)[None], self.image_size, method=self.preprocessing.resize)[0][0]
        return item


def collate_sam(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> one batch: images to encode, cached embeddings, and all prompts flattened with their slice index."""
    b = len(items)
    image_rows = [j for j, it in enumerate(items) if it["embedding"] is None]
    cached_rows = [j for j, it in enumerate(items) if it["embedding"] is not None]
    counts = torch.tensor([len(it["organs"]) for it in items], dtype=torch.long)
    batch: dict[str, Any] = {
        "cases": [it["case"] for it in items],
        "z": torch.tensor([it["z"] for it in items], dtype=torch.long),
        "slice_keys": [it["slice_key"] for it in items],
        "input_hw": torch.tensor([it["input_hw"] for it in items], dtype=torch.long).reshape(b, 2),
        "lowres_hw": torch.tensor([it["lowres_hw"] for it in items], dtype=torch.long).reshape(b, 2),
        "image_rows": torch.tensor(image_rows, dtype=torch.long),
        "images": torch.stack([items[j]["image"] for j in image_rows]) if image_rows else None,
        "cached_rows": torch.tensor(cached_rows, dtype=torch.long),
        "embeddings": torch.stack([items[j]["embedding"] for j in cached_rows]) if cached_rows else None,
        "interm": (
            torch.stack([items[j]["interm"] for j in cached_rows])
            if cached_rows and items[cached_rows[0]]["interm"] is not None
            else None
        ),
        "slice_index": torch.repeat_interleave(torch.arange(b), counts),
        "boxes": torch.cat([it["boxes"] for it in items]).reshape(-1, 4),
        "organs": torch.cat([it["organs"] for it in items]),
        "targets": torch.cat([it["targets"] for it in items]),
        # a batch takes its first item's draw: every prompt of it gets the same number of click rounds
        "clicks": int(items[0].get("clicks", 0)) if items else 0,
        "click_seed": int(items[0].get("click_seed", 0)) if items else 0,
    }
    return batch
