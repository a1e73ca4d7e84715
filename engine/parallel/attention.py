"""Sequence-parallel joint attention: Ulysses, ring, and both on a 2-D mesh (USP), for a replicated text segment
joined to a sharded image sequence.

Each rank calls the backend with its local q, k, v (B, T + S_local, H, D): the whole text (T tokens, identical on
every rank) as a prefix ([text | image]) or a suffix ([image | text]), and its own image shard. It returns
the attention output for the same tokens in the same order, equal to what one device computes for them.

- Ulysses (degree U): an all-to-all trades heads for sequence inside the Ulysses group, so each rank holds the
  group's whole image block for H/U heads. Text needs no communication: every rank slices its heads. The inverse
  all-to-all returns image outputs; text outputs are all-gathered over heads. Without a ring the heads travel in
  pieces (ulysses_chunks), pipelined so that one piece's transfers run under another's attention (ulysses_attention).
- Ring (degree R): image K/V blocks travel around the ring and partial outputs merge by log-sum-exp in fp32. Text
  keys are replicated, so they must enter each softmax exactly once: image queries see them in the first (local)
  step only, never in a travelling block. Text queries do not travel: each ring rank attends them to its own image
  block (the text keys joined to the first block for a prefix, the last for a suffix), and the R partials are
  all-gathered and merged in ring order, so every rank ends with the same bits.
- Independent work (attend_beside, with overlap on: OptimizeSpec.sp_overlap): a model may hand its attention call
  work that neither feeds nor reads it (a block's MLP input GEMM beside its attention); Ulysses runs it under the two
  transfers its pipeline leaves exposed, the first piece's all-to-all and the last inverse one (BesideWork).
- Lengths that do not divide are moved exactly (uneven all_to_all_single splits, ring receive buffers sized for
  the sender's block): no padding, so no mask is needed.
- Text sharded like the image (`configure(..., text_plan)`, for families whose text is never masked): each rank
  holds its text shard and image shard, nothing is computed twice. Ulysses puts the gathered shards in model order
  before the local kernel (so it stays equal to one device); a ring passes joint [text | image] blocks, the text
  keys travelling with their block (sharded_text_attention).
- A key mask (padded text in a batch of prompts of different lengths) may cover text keys only: the text is
  replicated, so its mask is too, and it goes wherever the text keys go (the local attention after the all-to-all,
  the ring's first block, the text queries' owner block). Image keys are never masked.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch

from engine.attention import AttentionFn, MaskedAttentionFn, masked_sdpa_attention
from engine.parallel.comm import all_gather_stacked, start_all_gather, start_all_to_all, start_ring_shift, wait
from engine.parallel.kernels import LseAttentionFn, fused_attention_lse, merge_ordered, merge_partials
from engine.parallel.mesh import Axis, Mesh
from engine.parallel.sharding import ShardPlan


def split_joint(x: torch.Tensor, text_len: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, ...) -> (text, image) along dim 1."""
    if text_first:
        return x[:, :text_len], x[:, text_len:]
    image_len = x.shape[1] - text_len
    return x[:, image_len:], x[:, :image_len]


def join_joint(text: torch.Tensor, image: torch.Tensor, text_first: bool) -> torch.Tensor:
    return torch.cat([text, image] if text_first else [image, text], dim=1)


# --- Ulysses ------------------------------------------------------------------------------------------------------
# How many pieces each rank's heads are cut into, so that the all-to-alls of one piece overlap the attention of
# another (ulysses_attention). Attention is independent per head, so every count gives the same bits; it only moves
# time. 2: on FLUX.1 (24 heads) a piece is 6 heads on ulysses2 and 3 on ulysses4, still enough query tiles to fill
# an H100 at 1024px (3 heads x 36 tiles of 128 queries ~ one wave of 132 SMs), while half of the attention can hide
# the other half's transfers. More pieces hide more, but each kernel gets smaller and each transfer carries fewer
# bytes per launch; tools/sp_bench.py measures 1 against the default.
ULYSSES_CHUNKS = 2

# attend(lo, hi, qkv): this rank's heads lo:hi (of its H/U after the all-to-all) for the whole Ulysses group's
# sequence, qkv (3, B, S_group, hi - lo, D) -> (out (B, S_group, hi - lo, D), side): side is None, or an output
# every rank computed whole for these heads (the replicated text, (B, T, hi - lo, D)), gathered over heads.
UlyssesAttendFn = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def usable_chunks(heads_per_rank: int, requested: int) -> int:
    """The largest count <= requested that divides the heads each rank holds (pieces must be equal: one layout)."""
    if requested < 1:
        raise ValueError(f"ulysses_chunks must be >= 1, got {requested}")
    return max(c for c in range(1, min(requested, heads_per_rank) + 1) if heads_per_rank % c == 0)


class BesideWork:
    """The independent work handed to one attention call (engine.attention.attend_beside), run in two parts where
    Ulysses leaves its transfers exposed: `run_first` while the first head piece's all-to-all is in flight (nothing
    else can run then: every piece's attention needs its received q, k, v), `run_rest` while the last piece's inverse
    all-to-all is (the attention is done; nothing else is left to run). The first part takes the larger half: the
    inputs carry q, k and v, the output one tensor. Results come back in the work's order, whatever ran where."""

    def __init__(self, work):
        self.work = list(work)
        self.results: list[torch.Tensor] = []
        self.first = (len(self.work) + 1) // 2

    def _run_to(self, n: int) -> None:
        while len(self.results) < n:
            self.results.append(self.work[len(self.results)]())

    def run_first(self) -> None:
        self._run_to(self.first)

    def run_rest(self) -> None:
        self._run_to(len(self.work))


def ulysses_attention(qkv: tuple[torch.Tensor, ...], sizes: tuple[int, ...], axis: Axis, chunks: int,
                      attend: UlyssesAttendFn, beside: BesideWork | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ulysses over `axis`: each of q, k, v (B, S_local, H, D) trades heads for sequence (rank j receives every
    rank's tokens for heads j*H/U:(j+1)*H/U), `attend` runs on them, and the inverse all-to-all brings each rank its
    own tokens back with all heads. Returns (out (B, S_local, H, D), side gathered to (B, T, H, D) or None).

    The heads each rank receives are cut into `chunks` equal pieces and pipelined: piece c+1's all-to-all is started
    before piece c's attention, piece c's inverse all-to-all right after it, and a result is waited for only where
    it is needed, so the transfers run under the attention of the neighbouring pieces. q, k and v travel in one
    all-to-all per piece (one NCCL launch instead of three), its send buffer built by one copy.
    Head index h = j * H/U + c * H/(U C) + i (rank j, piece c): the same heads, in the same order, as unchunked.
    `beside`: the caller's independent work, run under the two transfers nothing else hides (BesideWork)."""
    b, s, h, d = qkv[0].shape
    u, n = axis.size, len(qkv)
    hu = h // u
    hc = hu // chunks
    pieces = [x.view(b, s, u, chunks, hc, d) for x in qkv]

    def start_piece(c: int) -> torch.Tensor:
        # (u, s, n, b, hc, d): rows grouped by destination rank, q, k, v side by side in each row.
        send = torch.stack([x[:, :, :, c].permute(2, 1, 0, 3, 4) for x in pieces], dim=2)
        return start_all_to_all(send.view(u * s, n, b, hc, d), list(sizes), [s] * u, axis.group_name)

    outs, sides = [], []
    pending = start_piece(0)
    for c in range(chunks):
        following = start_piece(c + 1) if c + 1 < chunks else None
        if c == 0 and beside is not None:
            beside.run_first()
        received = wait(pending).permute(1, 2, 0, 3, 4)  # (n, b, S_group, hc, d)
        out, side = attend(c * hc, (c + 1) * hc, received)
        outs.append(start_all_to_all(out.permute(1, 0, 2, 3), [s] * u, list(sizes), axis.group_name))
        if side is not None:
            sides.append(start_all_gather(side, axis.group_name, u))
        pending = following
    if beside is not None:
        beside.run_rest()
    out = heads_from_pieces([wait(o).view(u, s, b, hc, d).transpose(1, 2) for o in outs])
    if not sides:
        return out, None
    t = sides[0].shape[1]
    return out, heads_from_pieces([wait(x).view(u, b, t, hc, d) for x in sides])


def heads_from_pieces(pieces: list[torch.Tensor]) -> torch.Tensor:
    """pieces[c] (U, B, L, H/(U C), D): piece c of every Ulysses rank's heads -> (B, L, H, D) in the model's head
    order, h = (rank, piece, i)."""
    return torch.stack(pieces, dim=1).permute(2, 3, 0, 1, 4, 5).flatten(2, 4)


# --- ring -----------------------------------------------------------------------------------------------------
def joint_key_mask(text_mask: torch.Tensor | None, image_len: int, text_first: bool) -> torch.Tensor | None:
    """The text keys' mask (B, T) joined to `image_len` always-attended image keys, in the joint order."""
    if text_mask is None:
        return None
    image = torch.ones(text_mask.shape[0], image_len, dtype=torch.bool, device=text_mask.device)
    return join_joint(text_mask, image, text_first)


def ring_attention(q, k, v, axis: Axis, block_sizes: tuple[int, ...], text_kv, text_first: bool,
                   lse_attention: LseAttentionFn, text_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """This ring rank's image queries against every rank's image block, plus the replicated text keys exactly once
    (with their mask, if any).

    Step i computes on the block of ring rank (index - i) while that block's successor is already in flight: the
    exchange for step i + 1 is started before step i's attention and waited for after its merge (double
    buffering). Returns fp32 (out, lse)."""
    r, size = axis.index, axis.size
    kv = torch.stack([k, v])  # one message per hop
    out = lse = None
    for step in range(size):
        src = (r - step) % size
        if step + 1 < size:
            incoming_shape = (2, kv.shape[1], block_sizes[(src - 1) % size], *kv.shape[3:])
            incoming = start_ring_shift(kv, r, size, math.prod(incoming_shape), axis.group_name)
        block_k, block_v = kv[0], kv[1]
        mask = None
        if step == 0 and text_kv is not None:
            # Text joins the local block only: it never travels, so no rank sees it twice.
            mask = joint_key_mask(text_mask, block_k.shape[1], text_first)
            block_k = join_joint(text_kv[0], block_k, text_first)
            block_v = join_joint(text_kv[1], block_v, text_first)
        block_out, block_lse = (lse_attention(q, block_k, block_v) if mask is None
                                else lse_attention(q, block_k, block_v, mask))
        if out is None:
            out, lse = block_out, block_lse
        else:
            out, lse = merge_partials(out, lse, block_out, block_lse)
        if step + 1 < size:
            kv = wait(incoming).view(incoming_shape)
    return out, lse


def ring_text_attention(tq, tk, tv, image_k, image_v, axis: Axis, text_first: bool,
                        lse_attention: LseAttentionFn, text_mask=None) -> torch.Tensor:
    """Replicated text queries against all keys: each ring rank covers its own image block, the first (prefix) or
    last (suffix) ring rank also the text keys (with their mask), and the partials are merged in ring order on
    every rank."""
    owner = 0 if text_first else axis.size - 1
    mask = None
    if axis.index == owner:
        mask = joint_key_mask(text_mask, image_k.shape[1], text_first)
        image_k, image_v = join_joint(tk, image_k, text_first), join_joint(tv, image_v, text_first)
    out, lse = (lse_attention(tq, image_k, image_v) if mask is None
                else lse_attention(tq, image_k, image_v, mask))
    packed = torch.cat([out, lse], dim=-1)  # one collective for both
    buf = all_gather_stacked(packed, axis.group_name, axis.size)
    out, _ = merge_ordered([(buf[i, ..., :-1], buf[i, ..., -1:]) for i in range(axis.size)])
    return out


# --- the backend ------------------------------------------------------------------------------------------------
class JointSequenceParallelAttention:
    """Drop-in for a model's `attention(q, k, v)`, and for a masked `attention(q, k, v, key_mask)` whose mask
    covers text keys only. The caller (the transformer wrapper) sets the layout of the current forward with
    `configure` before running the model; the model itself never knows."""

    def __init__(self, mesh: Mesh, local_attention: AttentionFn, lse_attention: LseAttentionFn = fused_attention_lse,
                 local_masked_attention: MaskedAttentionFn = masked_sdpa_attention,
                 ulysses_chunks: int = ULYSSES_CHUNKS, overlap: bool = False):
        self.mesh = mesh
        # Run a model's independent work under the Ulysses all-to-alls (attend_beside; OptimizeSpec.sp_overlap).
        self.overlap = overlap
        usable_chunks(1, ulysses_chunks)  # a count below 1 fails here, not at the first forward
        # Pieces each rank's heads are cut into for the Ulysses pipeline (ULYSSES_CHUNKS says why); fewer where the
        # heads per rank do not divide. Any count gives the same bits.
        self.ulysses_chunks = ulysses_chunks
        # Without a ring the whole sequence is local after the all-to-all: run the model's own kernel, in the
        # model's token order, so Ulysses is bitwise equal to one device (the masked one for a masked call).
        self.local_attention = local_attention
        self.local_masked_attention = local_masked_attention
        self.lse_attention = lse_attention
        self._checked_mask: weakref.ref | None = None  # the last key mask found to leave image keys unmasked
        self.text_len: int | None = None
        self.text_first = True
        self.plan: ShardPlan | None = None
        self.text_plan: ShardPlan | None = None

    def configure(self, text_len: int, text_first: bool, plan: ShardPlan, text_plan: ShardPlan | None = None) -> None:
        """text_plan: None when every rank holds the whole text (replicated), else how the text is cut."""
        for p in (plan, text_plan):
            if p is not None and len(p.sizes) != self.mesh.sp.size:
                raise ValueError(f"shard plan has {len(p.sizes)} shards for a sequence group of {self.mesh.sp.size}")
        if text_plan is not None and text_plan.total != text_len:
            raise ValueError(f"text plan covers {text_plan.total} tokens, the text has {text_len}")
        self.text_len, self.text_first, self.plan, self.text_plan = text_len, text_first, plan, text_plan

    def _check_image_keys_unmasked(self, key_mask: torch.Tensor, image_mask: torch.Tensor) -> None:
        """The mask may cover text keys only. Reading it is a host sync, so it is read once per mask tensor (a model
        passes one mask to all its blocks), and not at all while a CUDA graph is captured (illegal there; the
        capture's warm-up calls were checked) or while the compiler traces (a sync would break the graph)."""
        if torch.compiler.is_compiling() or (key_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if self._checked_mask is not None and self._checked_mask() is key_mask:
            return
        if not bool(image_mask.all()):
            raise ValueError("sequence-parallel attention masks text keys only; this call masks image keys")
        self._checked_mask = weakref.ref(key_mask)

    def vouch_for(self, key_mask: torch.Tensor) -> None:
        """A caller whose mask is True on every image key by construction (built so, not read from data) says so
        before the forward: the check would otherwise read each new mask on the host, which for a mask built anew
        every forward is a synchronisation per forward."""
        self._checked_mask = weakref.ref(key_mask)

    @property
    def hides_work(self) -> bool:
        """engine.attention.hides_work: only Ulysses leaves transfers that nothing else hides (a ring-only mesh
        overlaps each hop with the previous block's attention already)."""
        return self.overlap and self.mesh.ulysses.size > 1

    def attend_beside(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      work) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """engine.attention.attend_beside: the attention, with `work` run under its all-to-alls (BesideWork)."""
        beside = BesideWork(work)
        out = self._attend(q, k, v, None, beside)
        beside.run_rest()  # a path without windows (no Ulysses) runs it all here
        return out, beside.results

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """key_mask: None, or boolean (B, T + S_local) over this rank's joint sequence, True on every image key."""
        return self._attend(q, k, v, key_mask, None)

    def _attend(self, q, k, v, key_mask, beside: BesideWork | None) -> torch.Tensor:
        if self.plan is None:
            raise RuntimeError("sequence-parallel attention called before configure(): wrap the transformer "
                               "with engine.parallel.apply_parallel instead of setting the backend by hand")
        if self.text_plan is not None:
            if key_mask is not None:
                raise ValueError("sharded text takes no key mask: a family whose text is masked keeps it replicated")
            return self.sharded_text_attention(q, k, v, beside)
        mesh, plan, t, first = self.mesh, self.plan, self.text_len, self.text_first
        local_len = plan.sizes[mesh.sp.index]
        if q.shape[1] != t + local_len:
            raise ValueError(f"attention got {q.shape[1]} tokens; this rank holds {t} text + {local_len} image")
        (tq, iq), (tk, ik), (tv, iv) = (split_joint(x, t, first) for x in (q, k, v))
        text_mask = None
        if key_mask is not None:
            text_mask, image_mask = split_joint(key_mask.bool(), t, first)
            self._check_image_keys_unmasked(key_mask, image_mask)
        u_axis, r_axis = mesh.ulysses, mesh.ring
        # The image shards of our Ulysses group, which the all-to-all joins into one contiguous block.
        ulysses_sizes = plan.sizes[r_axis.index * u_axis.size:(r_axis.index + 1) * u_axis.size]
        if u_axis.size == 1:
            t_out, i_out = self._joint_attention(tq, tk, tv, iq, ik, iv, text_mask)
            return join_joint(t_out, i_out, first)
        heads = self._check_heads(q.shape[2])
        own = u_axis.index * (heads // u_axis.size)  # our first head: text needs no communication, we slice it

        def attend(lo: int, hi: int, qkv: torch.Tensor):
            tq_c, tk_c, tv_c = (x[:, :, own + lo:own + hi] for x in (tq, tk, tv))
            t_out, i_out = self._joint_attention(tq_c, tk_c, tv_c, *qkv.unbind(0), text_mask)
            return i_out, (t_out if t else None)
        i_out, t_out = ulysses_attention((iq, ik, iv), ulysses_sizes, u_axis, self._chunks(heads), attend, beside)
        return join_joint(t_out if t else q[:, :0], i_out, first)

    def _check_heads(self, heads: int) -> int:
        if heads % self.mesh.ulysses.size:
            raise ValueError(f"Ulysses degree {self.mesh.ulysses.size} must divide the number of heads ({heads})")
        return heads

    def _chunks(self, heads: int) -> int:
        """Pieces for this call. With a ring (USP) the heads stay whole: the ring merges partials with sigmoid and
        log-sigmoid, and on CPU an elementwise op computes a tensor's last few elements with the scalar function
        instead of the vector one, so the same head merged inside a smaller tensor can differ in its last bit
        (measured: usp2x2 fp32, 1 ulp on the text). Without a ring only the model's kernel runs, per head."""
        if self.mesh.ring.size > 1:
            return 1
        return usable_chunks(heads // self.mesh.ulysses.size, self.ulysses_chunks)

    def _joint_attention(self, tq, tk, tv, iq, ik, iv, text_mask):
        """Replicated text + the Ulysses group's image block (for some heads) -> (text out, image out), q's dtype:
        the model's kernel on the joint sequence without a ring, else ring attention over the ring axis."""
        r_axis, plan, t, first = self.mesh.ring, self.plan, self.text_len, self.text_first
        if r_axis.size == 1:
            joint = (join_joint(tq, iq, first), join_joint(tk, ik, first), join_joint(tv, iv, first))
            if text_mask is None:
                out = self.local_attention(*joint)
            else:
                out = self.local_masked_attention(*joint, joint_key_mask(text_mask, ik.shape[1], first))
            return split_joint(out, t, first)
        text_kv = (tk, tv) if t else None
        # The mask goes by keyword and only when there is one: the unmasked call keeps its signature.
        masked = {} if text_mask is None else {"text_mask": text_mask}
        i_out, _ = ring_attention(iq, ik, iv, r_axis, plan.group_sizes(self.mesh.ulysses.size), text_kv, first,
                                  self.lse_attention, **masked)
        if not t:
            return tq, i_out.to(iq.dtype)
        t_out = ring_text_attention(tq, tk, tv, ik, iv, r_axis, first, self.lse_attention, **masked)
        return t_out.to(tq.dtype), i_out.to(iq.dtype)

    def sharded_text_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               beside: BesideWork | None = None) -> torch.Tensor:
        """Text cut across the ranks like the image: each rank holds (B, t_i + s_i, H, D), its text shard and image
        shard in model order, and no token is computed twice. The Ulysses all-to-all gathers the group's shards,
        which are put in model order ([all text | all image] for a prefix) before the local kernel: without a ring
        it sees exactly what one device sees, in the same order. A ring then passes each group's joint block
        around: text keys travel with their image block, so each enters every softmax exactly once."""
        mesh, first = self.mesh, self.text_first
        u_axis, r_axis = mesh.ulysses, mesh.ring
        joint = tuple(t + s for t, s in zip(self.text_plan.sizes, self.plan.sizes))
        if q.shape[1] != joint[mesh.sp.index]:
            raise ValueError(f"attention got {q.shape[1]} tokens; this rank holds {self.text_plan.sizes[mesh.sp.index]}"
                             f" text + {self.plan.sizes[mesh.sp.index]} image")
        # Lengths of each Ulysses rank's leading and trailing part (text and image for a prefix), in group order.
        group = slice(r_axis.index * u_axis.size, (r_axis.index + 1) * u_axis.size)
        lead, trail = (self.text_plan.sizes, self.plan.sizes) if first else (self.plan.sizes, self.text_plan.sizes)
        lead, trail = lead[group], trail[group]
        if u_axis.size == 1:
            return self._sharded_block_attention(q, k, v)

        def attend(lo: int, hi: int, qkv: torch.Tensor):
            out = self._sharded_block_attention(*to_model_order(qkv, lead, trail, dim=2).unbind(0))
            return to_rank_order(out, lead, trail, dim=1), None
        out, _ = ulysses_attention((q, k, v), joint[group], u_axis, self._chunks(self._check_heads(q.shape[2])),
                                   attend, beside)
        return out

    def _sharded_block_attention(self, q, k, v):
        """The Ulysses group's joint block in model order (for some heads): the model's kernel, or the ring."""
        u_axis, r_axis = self.mesh.ulysses, self.mesh.ring
        if r_axis.size == 1:
            return self.local_attention(q, k, v)
        joint = tuple(t + s for t, s in zip(self.text_plan.sizes, self.plan.sizes))
        block_sizes = tuple(sum(joint[g * u_axis.size:(g + 1) * u_axis.size]) for g in range(r_axis.size))
        out, _ = ring_attention(q, k, v, r_axis, block_sizes, None, self.text_first, self.lse_attention)
        return out.to(q.dtype)


def to_model_order(x: torch.Tensor, lead: tuple[int, ...], trail: tuple[int, ...], dim: int) -> torch.Tensor:
    """Per-rank pieces [lead_0 trail_0 | lead_1 trail_1 | ...] along `dim` -> [lead_0 lead_1 ... | trail_0 ...]."""
    pieces = x.split([n for pair in zip(lead, trail) for n in pair], dim=dim)
    return torch.cat(pieces[0::2] + pieces[1::2], dim=dim)


def to_rank_order(x: torch.Tensor, lead: tuple[int, ...], trail: tuple[int, ...], dim: int) -> torch.Tensor:
    """Inverse of to_model_order."""
    pieces = x.split(list(lead) + list(trail), dim=dim)
    n = len(lead)
    return torch.cat([p for i in range(n) for p in (pieces[i], pieces[n + i])], dim=dim)
