"""The graph caches' policy on the CPU: when a signature runs eagerly, is recorded, replayed,
evicted or dropped, and when a training replay must give way to the eager path. The recording
itself is replaced by a stand-in here; tests/test_gpu.py runs the real one."""
import pickle
import weakref

import pytest
import torch

from restv2_mm.models.cuda_graphs import GraphCache, TrainGraphCache, _standing_in


class Recorded:
    """Stands in for a recorded graph: counts its replays and returns a marker."""

    def __init__(self, x):
        self.shape = tuple(x.shape)
        self.replays = 0

    def __call__(self, x):
        self.replays += 1
        return ('replayed', tuple(x.shape))


def stand_in(cache_type, **kwargs):
    class Cache(cache_type):
        def _record(self, forward, x):
            if tuple(x.shape) == (1, 3, 13, 13):
                raise RuntimeError('operation not permitted when stream is capturing')
            return Recorded(x)

    return Cache(**kwargs)


def eager(x):
    return ('eager', tuple(x.shape))


def calls(cache, size, times=1, state='state'):
    """The last result of ``times`` calls at an 8 x size input."""
    for _ in range(times):
        out = cache(eager, torch.zeros(1, 3, 8, size), state)
    return out[0]


@pytest.mark.parametrize('cache_type', [GraphCache, TrainGraphCache])
def test_a_signature_runs_eagerly_once_then_is_recorded_and_replayed(cache_type):
    cache = stand_in(cache_type, max_graphs=2)
    assert calls(cache, 8) == 'eager'
    assert calls(cache, 8) == 'replayed' and cache.captures == 1
    assert calls(cache, 8) == 'replayed' and cache.captures == 1
    assert calls(cache, 9, 2) == 'replayed' and cache.captures == 2
    # another state (new weights, a frozen stage) drops every graph and the counts
    assert calls(cache, 8, state='other state') == 'eager' and len(cache) == 0
    assert cache.sightings == {((1, 3, 8, 8), torch.float32, torch.device('cpu'), None): 1}


@pytest.mark.parametrize('cache_type', [GraphCache, TrainGraphCache])
def test_a_full_cache_keeps_the_frequent_sizes_and_leaves_the_rare_ones_eager(cache_type):
    cache = stand_in(cache_type, max_graphs=2)
    calls(cache, 8, 10)  # seen 10 times
    calls(cache, 9, 4)  # seen 4 times
    # a third size seen as often as the least-seen recorded one, or a quarter more, stays
    # eager: sizes about as frequent as each other do not take turns
    assert calls(cache, 10, 5) == 'eager' and cache.captures == 2
    # seen more often than that, it takes the place of the least-seen one
    assert calls(cache, 10) == 'replayed' and cache.captures == 3
    assert set(s[0][-1] for s in cache.graphs) == {8, 10}
    assert calls(cache, 9) == 'eager'  # 5 sightings against 6 and 10
    # many sizes seen once or twice never push a frequent one out
    for size in range(20, 60):
        assert calls(cache, size, 2) == 'eager'
    assert set(s[0][-1] for s in cache.graphs) == {8, 10} and cache.captures == 3
    # the counts are bounded: the least-seen sizes that are not recorded are forgotten
    assert len(cache.sightings) <= 16 * 2
    assert cache.sightings[((1, 3, 8, 8), torch.float32, torch.device('cpu'), None)] == 10


@pytest.mark.parametrize('cache_type', [GraphCache, TrainGraphCache])
def test_a_failed_recording_warns_once_and_stays_eager(cache_type, monkeypatch):
    from restv2_mm.models import cuda_graphs
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *args: None)
    ended = []  # the random-number generator's recording state is ended after a failure
    monkeypatch.setattr(cuda_graphs, '_end_random_state_recording', ended.append)
    warnings = []
    cache = stand_in(cache_type, on_failure=warnings.append)
    x = torch.zeros(1, 3, 13, 13)
    for _ in range(4):
        assert cache(eager, x, 'state')[0] == 'eager'
    assert ended == [x.device]
    assert len(warnings) == 1 and 'capturing' in str(warnings[0])
    assert cache.captures == 0 and 'capturing' in cache.failed[((1, 3, 13, 13), torch.float32,
                                                                 x.device, None)]


def test_a_training_forward_waits_for_the_open_backward():
    cache = stand_in(TrainGraphCache)
    x = torch.zeros(1, 3, 8, 8)
    cache(eager, x, 'state')
    assert cache(eager, x, 'state')[0] == 'replayed'

    class Node:  # stands in for the autograd node of the replay, whose backward is to come
        pass

    node = Node()
    cache.open_backward = weakref.ref(node)
    assert cache(eager, x, 'state')[0] == 'eager'  # the graph's buffers hold the first one
    del node  # its graph was dropped without a backward: nothing is open any more
    assert cache(eager, x, 'state')[0] == 'replayed'


def test_a_training_recording_reads_stand_ins_of_the_owners_parameters():
    """The recorded forward sees new leaves on the parameters' memory where the owner held
    its parameters (the nodes that accumulate the parameters' gradients may have been made
    before, as DistributedDataParallel makes them); afterwards, and after a failure, the
    owner holds its parameters again."""
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    second.weight = first.weight  # one parameter held by two modules
    owner = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    params = list(owner.parameters())  # first.weight, first.bias, second.bias
    stand_ins = [torch.nn.Parameter(p.detach()) for p in params]
    with _standing_in(owner, params, stand_ins):
        assert owner[0].weight is owner[2].weight is stand_ins[0]
        assert owner[2].bias is stand_ins[2]
        assert owner[0].weight.data_ptr() == params[0].data_ptr()
        loss = owner(torch.ones(1, 3)).sum()
    grads = torch.autograd.grad(loss, stand_ins)
    assert all(p.grad is None for p in params) and grads[0].abs().sum() > 0
    with pytest.raises(RuntimeError, match='mid-recording'), \
            _standing_in(owner, params, stand_ins):
        raise RuntimeError('mid-recording')
    assert owner[0].weight is owner[2].weight is params[0] and owner[2].bias is params[2]
    with _standing_in(None, params, stand_ins):  # no owner: nothing changes
        assert owner[0].weight is params[0]

    cache = stand_in(TrainGraphCache)
    x = torch.zeros(1, 3, 8, 8)
    for _ in range(2):
        cache(eager, x, 'state', params, owner)
    assert cache.captures == 1 and cache._owner is None  # the owner is not held after a call
    held = weakref.ref(owner)
    del owner, first, second
    assert held() is None


def test_bad_sizes_name_their_argument_and_copies_start_empty():
    with pytest.raises(ValueError, match='train_graph_cache_size=0 must be a positive int'):
        TrainGraphCache(0, arg_name='train_graph_cache_size')
    cache = stand_in(TrainGraphCache, max_graphs=3)
    x = torch.zeros(1, 3, 8, 8)
    cache(eager, x, 'state')
    cache(eager, x, 'state')
    again = pickle.loads(pickle.dumps(TrainGraphCache(3, arg_name='train_graph_cache_size')))
    assert len(again) == 0 and again.max_graphs == 3
    assert again.arg_name == 'train_graph_cache_size' and again.open_backward is None


def test_copies_keep_what_recordings_hold_on_to():
    from restv2_mm.models.windows import keep_tables_read
    cache = GraphCache(2, keep=keep_tables_read)
    for again in (pickle.loads(pickle.dumps(cache)), __import__('copy').deepcopy(cache)):
        assert again.keep is keep_tables_read and len(again) == 0
    with GraphCache(2)._keeping() as kept:  # without ``keep``: nothing to hold
        assert kept == []
