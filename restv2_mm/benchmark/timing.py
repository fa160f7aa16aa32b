"""Timing and memory: isolated measurements on one device, kept by key."""
import contextlib
import gc
import sys
import time
import traceback
from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np
import torch


def graph_pool_bytes(device: torch.device) -> int:
    """Memory that CUDA graphs' private pools hold beyond what the allocated-memory counters
    show: a replay reuses the blocks its recording freed, which the counters see as free.
    Added to every measured peak, so that a model replaying graphs is not counted lighter
    than it is."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(seg['total_size'] - seg['allocated_size']
               for seg in torch.cuda.memory_snapshot()
               if seg.get('device', index) == index
               and tuple(seg.get('segment_pool_id', (0, 0))) != (0, 0))


class Bench:
    """Runs isolated measurements on one device and keeps their results by key."""

    def __init__(self, device: torch.device, amp: bool, compile_models: bool = False,
                 cudnn_benchmark: bool = True):
        self.device = device
        self.cuda = device.type == 'cuda'
        self.amp = amp and self.cuda
        self.compile_models = compile_models
        self.allow_cudnn_benchmark = cudnn_benchmark and self.cuda
        self.results: Dict[str, dict] = {}
        # by key: (kernels, their summed time in ms) of one step, taken in the first round
        self.kernel_counts: Dict[str, Tuple[int, float]] = {}
        torch.backends.cudnn.benchmark = self.allow_cudnn_benchmark

    @contextlib.contextmanager
    def cudnn_benchmark(self, enabled: bool):
        """cudnn autotuning as a whole model's config asks (env_cfg.cudnn_benchmark)."""
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = bool(enabled) and self.allow_cudnn_benchmark
        try:
            yield torch.backends.cudnn.benchmark
        finally:
            torch.backends.cudnn.benchmark = before

    def autocast(self):
        if self.amp:
            return torch.autocast('cuda', dtype=torch.float16)
        return contextlib.nullcontext()

    def maybe_compile(self, module):
        return torch.compile(module) if self.compile_models else module

    def clear(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def time_steps(self, step: Callable[[], object], warmup: int, reps: int) -> dict:
        """Median and spread of ``reps`` timed calls of ``step`` after ``warmup`` calls."""
        for _ in range(warmup):
            step()
        base_mb = peak_mb = graphs_mb = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        times = [self._one_timed_call(step) for _ in range(reps)]
        if self.cuda:
            graphs = graph_pool_bytes(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) + graphs
            base_mb, peak_mb, graphs_mb = base / 2**20, peak / 2**20, graphs / 2**20
        return dict(summary(times), warmup=warmup, reps=reps, base_mb=base_mb,
                    peak_mb=peak_mb, graph_pool_mb=graphs_mb)

    def kernels_per_step(self, step: Callable[[], object]) -> Tuple[int, float]:
        """How many GPU kernels one call of ``step`` launches, and their run times summed in
        ms: the step's GPU work (torch.profiler)."""
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(self.device)
        return kernel_summary(prof.events())

    def _count_kernels(self, key: str, step: Callable[[], object], entry: dict):
        """Once per key (the counts do not change between rounds), on CUDA: the entry's
        ``kernels`` and ``kernel_ms``, what the GPU runs of one step."""
        if not self.cuda:
            return
        if key not in self.kernel_counts:
            self.kernel_counts[key] = self.kernels_per_step(step)
        entry['kernels'], entry['kernel_ms'] = self.kernel_counts[key]

    def measure(self, key: str, setup: Callable[[], Callable[[], object]], reps, *,
                items: int = 1, unit: str = 'img/s', count_kernels: bool = False,
                **info) -> dict:
        """Build with ``setup()`` (which returns the step to time), time it, keep the result.

        ``count_kernels``: also count the GPU kernels of one more call (on CUDA; once per
        key, the count does not change between rounds).

        Whatever goes wrong (out of memory included) is recorded in the entry's ``status``
        and ``error``; the caller's next measurement runs regardless.
        """
        entry = dict(key=key, section=key.split('/')[0], items=items, unit=unit, **info)
        step = None
        try:
            self.clear()
            step = setup()
            entry.update(self.time_steps(step, *reps))
            entry['per_s'] = items * 1e3 / entry['median_ms']
            if count_kernels:
                self._count_kernels(key, step, entry)
            entry['status'] = 'ok'
        except Exception as e:  # noqa: BLE001  (any failure is a result to report)
            self._record_failure(entry, e)
        finally:
            step = None
            self.clear()
        self.results[key] = entry
        print('  ' + progress_line(entry), flush=True)
        return entry

    def measure_side_by_side(self, specs: List[dict], reps) -> Dict[str, dict]:
        """Measure several models that are compared with each other, their timed steps
        interleaved: one step of each in turn, so that the host's busy phases fall on all
        of them alike (a whole detector's iteration is bound by the host launching its
        kernels, and on a shared host that pace changes within seconds).

        Each spec is a dict with ``key`` and ``setup`` as for :meth:`measure` and the
        entry's other fields (``items``, ``unit``, ``count_kernels``, info). The models are
        set up one after the other and stay resident; each one's peak memory is taken
        over its own warm-up and a few more steps, less what the models set up before it
        hold (they are idle meanwhile, so the bytes add up exactly). A model that fails
        is recorded as in :meth:`measure` and the others go on.
        """
        warmup, timed = reps
        steps: Dict[str, Callable[[], object]] = {}
        entries: Dict[str, dict] = {}
        self.clear()
        for spec in specs:
            spec = dict(spec)
            key, setup = spec.pop('key'), spec.pop('setup')
            count_kernels = spec.pop('count_kernels', False)
            entry = entries[key] = dict(key=key, section=key.split('/')[0],
                                        items=spec.pop('items', 1),
                                        unit=spec.pop('unit', 'img/s'), **spec)
            try:
                others = self._resident()
                step = setup()
                entry.update(self._memory_over(step, warmup, others))
                if count_kernels:
                    self._count_kernels(key, step, entry)
                steps[key] = step
            except Exception as e:  # noqa: BLE001  (any failure is a result to report)
                self._record_failure(entry, e)
                step = None  # its memory goes before the next model is set up
                gc.collect()
        step = None
        try:
            times = self._interleaved_times(steps, timed, entries)
            for key, ts in times.items():
                others = [k for k in times if k != key]
                entry = entries[key]
                entry.update(summary(ts), reps=timed, status='ok',
                             timing=f'interleaved with {", ".join(others) or "nothing"}')
                entry['per_s'] = entry['items'] * 1e3 / entry['median_ms']
        finally:
            steps.clear()
            self.clear()
        for key, entry in entries.items():
            self.results[key] = entry
            print('  ' + progress_line(entry), flush=True)
        return entries

    def _resident(self) -> tuple:
        """Bytes allocated and held in graph pools now (the models already set up)."""
        if not self.cuda:
            return 0, 0
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device), graph_pool_bytes(self.device)

    def _memory_over(self, step, warmup: int, others: tuple, extra_steps: int = 2) -> dict:
        """Warm ``step`` up and take its peak memory (on CUDA) over the warm-up's last step
        and ``extra_steps`` more, less ``others`` (see :meth:`_resident`)."""
        if not self.cuda:
            for _ in range(warmup):
                step()
            return dict(warmup=warmup, base_mb=None, peak_mb=None, graph_pool_mb=None)
        for _ in range(max(warmup - 1, 0)):
            step()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device) - others[0]
        for _ in range(1 + extra_steps):
            step()
        torch.cuda.synchronize(self.device)
        graphs = graph_pool_bytes(self.device) - others[1]
        peak = torch.cuda.max_memory_allocated(self.device) - others[0] + graphs
        return dict(warmup=warmup, base_mb=base / 2**20, peak_mb=peak / 2**20,
                    graph_pool_mb=graphs / 2**20)

    def _interleaved_times(self, steps: Dict[str, Callable[[], object]], reps: int,
                           entries: Dict[str, dict]) -> Dict[str, List[float]]:
        """``reps`` timed calls of each step, one of each in turn; a step that raises is
        recorded in its entry and left out from then on."""
        times = {key: [] for key in steps}
        for _ in range(reps):
            for key in list(times):
                try:
                    times[key].append(self._one_timed_call(steps[key]))
                except Exception as e:  # noqa: BLE001
                    self._record_failure(entries[key], e)
                    del times[key], steps[key]
                    gc.collect()
        return times

    def _one_timed_call(self, step) -> float:
        """Milliseconds of one call of ``step``, from an idle device to its last kernel."""
        if not self.cuda:
            t0 = time.perf_counter()
            step()
            return (time.perf_counter() - t0) * 1e3
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def _record_failure(self, entry: dict, e: Exception):
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e)
        entry['status'] = 'OOM' if oom else 'error'
        entry['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        print(f'  ! {entry["key"]} failed: {entry["error"]}', file=sys.stderr)
        if not oom:
            traceback.print_exc(file=sys.stderr)

    def skip(self, key: str, note: str, **info) -> dict:
        entry = dict(key=key, section=key.split('/')[0], status='skipped', note=note, **info)
        self.results[key] = entry
        print(f'  - {key}: skipped ({note})', flush=True)
        return entry


def kernel_summary(events: Iterable) -> Tuple[int, float]:
    """(kernels, their summed time in ms) among a profile's events: the device's events
    less its copies and fills."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(('Memcpy', 'Memset'))]
    return len(kernels), sum(e.device_time for e in kernels) / 1e3


def kernels_text(e: dict) -> str:
    """', N kernels a step (X ms of GPU work)' for an entry whose kernels were counted."""
    if e.get('kernels') is None:
        return ''
    work = f' ({e["kernel_ms"]:.1f} ms of GPU work)' if e.get('kernel_ms') is not None else ''
    return f', {e["kernels"]} kernels a step{work}'


def summary(times: List[float]) -> dict:
    return dict(median_ms=float(np.median(times)), mean_ms=float(np.mean(times)),
                min_ms=float(np.min(times)), max_ms=float(np.max(times)))


def progress_line(e: dict) -> str:
    if e['status'] != 'ok':
        return f'{e["key"]}: {e["status"]} {e.get("error", e.get("note", ""))}'
    mem = f', peak {e["peak_mb"]:.0f} MB' if e.get('peak_mb') is not None else ''
    return (f'{e["key"]}: {e["median_ms"]:.2f} ms, {e["per_s"]:.1f} {e["unit"]}{mem}'
            f'{kernels_text(e)}')


def keep_best_rounds(best: Dict[str, dict], results: Dict[str, dict]) -> Dict[str, dict]:
    """Fold one round's results into ``best``: per key, the round with the lowest median.

    Every round's median and peak memory stay in the entry's ``round_medians_ms`` and
    ``round_peaks_mb`` (None for a failed round, or where memory is not measured): the
    entry's own peak is its fastest round's, and the peaks can differ between rounds. A
    failure is kept only while no round of that key has succeeded.
    """
    for key, entry in results.items():
        old = best.get(key) or {}
        medians = old.get('round_medians_ms', []) + [entry.get('median_ms')]
        peaks = old.get('round_peaks_mb', []) + [entry.get('peak_mb')]
        better = not old or (entry['status'] == 'ok' and (
            old['status'] != 'ok' or entry['median_ms'] < old['median_ms']))
        if better:
            best[key] = dict(entry)
        best[key]['round_medians_ms'] = medians
        best[key]['round_peaks_mb'] = peaks
    return best
