"""Concurrent use: forward/backward in several threads while another thread reloads state.

A torn result is acceptable (as with nn.Linear, whose weight a concurrent load_state_dict also
rewrites under a running matmul), and so is autograd's clean "modified by an inplace operation"
error when a reload rewrites a tensor saved for backward (nn.Linear gives the same), and the
operator's IndexError when every copy it took of the index was torn by the writer (the copy is
validated, so a torn one is refused, never used); memory corruption is not, and neither is any
other exception. One block is packed for inference (its one-token calls read packs made again
after every reload, from a validated copy of the index). The operators read a private,
validated copy of each index (csrc/rbe_ops_common.h, rbe_index_snapshot), so whatever another
thread writes into ``index`` during a call, the kernels stay in bounds.

The stress runs in a child process, so that a crash (SIGSEGV, "double free or corruption")
fails this test instead of killing the test session. `make asan-stress` runs the same script
against an AddressSanitizer build of the extension.
"""
import os
import subprocess
import sys

STRESS = r"""
import sys, threading, time
import torch
import rbe_ffn

torch.manual_seed(0)
seconds = float(sys.argv[1])
torch.set_num_threads(1)
lin = rbe_ffn.RBELinear(512, 512, block_size=64, k=300)
ffn = rbe_ffn.RBEFeedForward(128, 384, block_size=32, k=100, checkpoint=True)
# packed for inference: one-token calls without grad read packs, made again after each reload
packed = rbe_ffn.pack_for_inference(rbe_ffn.RBEFeedForward(128, 384, block_size=32, k=100))
# two valid states per module whose indexes differ everywhere
states = []
for m in (lin, ffn, packed):
    a = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_parameters() if hasattr(m, "reset_parameters") else [l.reset_parameters() for l in (m.fc1, m.fc2)]
    b = {k: v.clone() for k, v in m.state_dict().items()}
    states.append((m, a, b))
stop = time.monotonic() + seconds
errors, counts = [], {"calls": 0, "loads": 0}

def work(m, d_in, tokens, backward, grad=True):
    x = torch.randn(tokens, d_in, requires_grad=backward)
    while time.monotonic() < stop:
        try:
            with torch.set_grad_enabled(grad):
                y = m(x)
            if backward:
                y.sum().backward()
            counts["calls"] += 1
        except RuntimeError as e:  # autograd's saved-tensor check, exactly as for nn.Linear
            if "modified by an inplace operation" not in str(e):
                errors.append(repr(e))
        except IndexError as e:  # a copy of the index torn by the reload three times running: refused
            if "or another thread kept rewriting it" not in str(e):
                errors.append(repr(e))
        except Exception as e:
            errors.append(repr(e))

def reload():
    i = 0
    while time.monotonic() < stop:
        for m, a, b in states:
            m.load_state_dict(a if i % 2 else b)
        i += 1
        counts["loads"] += 1

threads = [threading.Thread(target=work, args=(lin, 512, 200, False)),
           threading.Thread(target=work, args=(lin, 512, 70, True)),
           threading.Thread(target=work, args=(ffn, 128, 100, True)),
           threading.Thread(target=work, args=(lin, 512, 3, False)),  # few tokens (csrc/rbe.h)
           threading.Thread(target=work, args=(ffn, 128, 5, True)),
           threading.Thread(target=work, args=(packed, 128, 1, False, False)),  # packed (no grad)
           threading.Thread(target=reload)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
assert counts["calls"] > 10 and counts["loads"] > 10, counts
print("ok", counts)
"""


def run_stress(seconds: float, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STRESS, str(seconds)], capture_output=True, text=True,
                          timeout=120 + 10 * seconds, env=env)


def test_reload_during_inference_and_training_is_memory_safe():
    r = run_stress(4.0, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
    assert r.stdout.startswith("ok"), r.stdout


if __name__ == "__main__":  # make asan-stress
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    r = run_stress(seconds)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr[-8000:])
    sys.exit(r.returncode)
