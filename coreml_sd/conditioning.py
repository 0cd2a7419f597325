"""What the UNet is conditioned on, as one object from the pipeline to every engine.

`TextEncoding` is what one text encoder returns for a batch of token ids: the hidden state its
family feeds the UNet (B, 77, C) and, where the family uses it, the pooled output (B, P).
`Conditioning` is everything beside the noisy latent and the timestep that one UNet call takes,
batched row by row like the latents:

    context       (B, S, C)  encoder_hidden_states: the text encoders' hidden states side by side
    pooled        (B, P)     the pooled text embedding (SDXL), or None
    extra         {name: (B, k)}  the family's extra UNet inputs (text_embeds, time_ids, ...)
    control       residuals added to the UNet's skip connections and middle block (ControlNet)
    latent_extra  (B, k, h, w)  channels concatenated to the latents (inpainting: mask, masked image)

Arrays are numpy or torch, all of one kind; `map` converts every field at an engine boundary.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

from coreml_sd import arrays
from coreml_sd.errors import InputError


@dataclass(frozen=True)
class TextEncoding:
    hidden: Any  # (B, 77, C)
    pooled: Any = None  # (B, P)


@dataclass(frozen=True)
class Conditioning:
    context: Any
    pooled: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    control: tuple | None = None
    latent_extra: Any = None

    @property
    def rows(self) -> int:
        return int(self.context.shape[0])

    def arrays(self) -> list[tuple[str, Any]]:
        """(name, array) of every array field that is set, in a fixed order."""
        out = [("context", self.context)]
        if self.pooled is not None:
            out.append(("pooled", self.pooled))
        out += [(f"extra.{k}", v) for k, v in self.extra.items()]
        out += [(f"control.{i}", v) for i, v in enumerate(self.control or ())]
        if self.latent_extra is not None:
            out.append(("latent_extra", self.latent_extra))
        return out

    def map(self, fn: Callable[[Any], Any]) -> "Conditioning":
        """The same conditioning with `fn` applied to every array (conversion between engines)."""
        return Conditioning(
            context=fn(self.context),
            pooled=None if self.pooled is None else fn(self.pooled),
            extra={k: fn(v) for k, v in self.extra.items()},
            control=None if self.control is None else tuple(fn(c) for c in self.control),
            latent_extra=None if self.latent_extra is None else fn(self.latent_extra),
        )

    def rows_slice(self, start: int, stop: int) -> "Conditioning":
        return self.map(lambda a: a[start:stop])

    def repeat(self, batch: int) -> "Conditioning":
        """For `batch` latents: as it is, or its single row repeated."""
        if self.rows == batch:
            return self
        if self.rows != 1:
            raise InputError(f"conditioning has {self.rows} rows for a batch of {batch} latents; expected {batch} or 1")
        return self.map(lambda a: arrays.concat([a] * batch))

    @staticmethod
    def concat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Row-wise concatenation (e.g. unconditional rows, then conditional rows)."""
        first = parts[0]
        for p in parts[1:]:
            if [n for n, _ in p.arrays()] != [n for n, _ in first.arrays()]:
                raise InputError("conditionings to concatenate carry different fields: "
                                 f"{[n for n, _ in first.arrays()]} and {[n for n, _ in p.arrays()]}")

        def cat(getter):
            return arrays.concat([getter(p) for p in parts])

        return Conditioning(
            context=cat(lambda p: p.context),
            pooled=None if first.pooled is None else cat(lambda p: p.pooled),
            extra={k: cat(lambda p, k=k: p.extra[k]) for k in first.extra},
            control=None if first.control is None else tuple(
                cat(lambda p, i=i: p.control[i]) for i in range(len(first.control))),
            latent_extra=None if first.latent_extra is None else cat(lambda p: p.latent_extra),
        )

    def with_(self, **changes) -> "Conditioning":
        return replace(self, **changes)

    def check_rows(self, rows: int, where: str) -> None:
        """Every array has `rows` rows (the latents'); checked once at each engine boundary."""
        for name, value in self.arrays():
            if not name.startswith("control.") and int(value.shape[0]) != rows:
                raise InputError(f"{where}: conditioning {name} has {value.shape[0]} rows for {rows} latents")


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Conditioning))
