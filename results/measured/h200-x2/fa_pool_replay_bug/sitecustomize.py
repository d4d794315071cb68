# Diagnostic variants of FA Pool's grouped prefill, patched in at interpreter start (PROBE_VARIANT).
import os

_v = os.environ.get("PROBE_VARIANT", "")
if _v:
    import torch
    import model.parallel.fa_pool as fp
    from model.parallel.transport import Transport

    if "eager_send" in _v:  # the pool waits for each unit's partials before the next unit (the old form)
        def _chunk(self, plans):
            for layer in range(self.n_layers):
                for plan in plans:
                    if not len(plan.long):
                        continue
                    buf, works = self._post_prefill_receive(plan)
                    Transport.wait(works)
                    packed = self._pool_prefill(layer, plan, buf)
                    if packed is not None:
                        self._send([(r, packed[r], "prefill_partials") for r in range(self.tp)])
        fp.FAPoolEngine._pool_prefill_chunk = _chunk

    if "sync_all" in _v:  # the device synchronized after every base unit and every pool unit
        _fin, _pool = fp.FAPoolEngine._finish_prefill_attention, fp.FAPoolEngine._pool_prefill

        def _fin2(self, out, pending):
            r = _fin(self, out, pending)
            torch.cuda.synchronize()
            return r

        def _pool2(self, layer, plan, buf):
            r = _pool(self, layer, plan, buf)
            torch.cuda.synchronize()
            return r
        fp.FAPoolEngine._finish_prefill_attention, fp.FAPoolEngine._pool_prefill = _fin2, _pool2
