"""Timing and memory: isolated measurements on one device, kept by key."""
import contextlib
import gc
import sys
import time
import traceback
from typing import Callable, Dict

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
        self.kernel_counts: Dict[str, int] = {}  # by key: counted once, in the first round
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
        times = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            for _ in range(reps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            graphs = graph_pool_bytes(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) + graphs
            base_mb, peak_mb, graphs_mb = base / 2**20, peak / 2**20, graphs / 2**20
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            base_mb = peak_mb = graphs_mb = None
        return dict(median_ms=float(np.median(times)), mean_ms=float(np.mean(times)),
                    min_ms=float(np.min(times)), max_ms=float(np.max(times)),
                    warmup=warmup, reps=reps, base_mb=base_mb, peak_mb=peak_mb,
                    graph_pool_mb=graphs_mb)

    def kernels_per_step(self, step: Callable[[], object]) -> int:
        """How many GPU kernels one call of ``step`` launches (torch.profiler)."""
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(self.device)
        return sum(1 for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(('Memcpy', 'Memset')))

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
            if count_kernels and self.cuda:
                if key not in self.kernel_counts:
                    self.kernel_counts[key] = self.kernels_per_step(step)
                entry['kernels'] = self.kernel_counts[key]
            entry['status'] = 'ok'
        except Exception as e:  # noqa: BLE001  (any failure is a result to report)
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e)
            entry['status'] = 'OOM' if oom else 'error'
            entry['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            print(f'  ! {key} failed: {entry["error"]}', file=sys.stderr)
            if not oom:
                traceback.print_exc(file=sys.stderr)
        finally:
            step = None
            self.clear()
        self.results[key] = entry
        print('  ' + progress_line(entry), flush=True)
        return entry

    def skip(self, key: str, note: str, **info) -> dict:
        entry = dict(key=key, section=key.split('/')[0], status='skipped', note=note, **info)
        self.results[key] = entry
        print(f'  - {key}: skipped ({note})', flush=True)
        return entry


def progress_line(e: dict) -> str:
    if e['status'] != 'ok':
        return f'{e["key"]}: {e["status"]} {e.get("error", e.get("note", ""))}'
    mem = f', peak {e["peak_mb"]:.0f} MB' if e.get('peak_mb') is not None else ''
    kernels = f', {e["kernels"]} kernels a step' if e.get('kernels') is not None else ''
    return (f'{e["key"]}: {e["median_ms"]:.2f} ms, {e["per_s"]:.1f} {e["unit"]}{mem}'
            f'{kernels}')


def keep_best_rounds(best: Dict[str, dict], results: Dict[str, dict]) -> Dict[str, dict]:
    """Fold one round's results into ``best``: per key, the round with the lowest median.

    Every round's median stays in the entry's ``round_medians_ms`` (None for a failed one);
    a failure is kept only while no round of that key has succeeded.
    """
    for key, entry in results.items():
        old = best.get(key)
        medians = (old or {}).get('round_medians_ms', []) + [entry.get('median_ms')]
        better = old is None or (entry['status'] == 'ok' and (
            old['status'] != 'ok' or entry['median_ms'] < old['median_ms']))
        if better:
            best[key] = dict(entry)
        best[key]['round_medians_ms'] = medians
    return best
