"""Echo model (test infrastructure only): streams the UTF-8 text back one character per response.

Like deepseek_v4's model.py it must fix sys.path from DSV4_STUB_SYSPATH before importing numpy, so the
stub sees numpy<2 (Triton 2.51's Python backend mis-reads BYTES tensors under numpy 2).
"""
import os
import sys


def _fix_sys_path() -> None:
    import site

    paths = [p for p in os.environ.get("DSV4_STUB_SYSPATH", "").split(os.pathsep) if p]
    for p in reversed(paths):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    for p in paths:
        if p.rstrip("/").endswith("-packages"):
            site.addsitedir(p)  # process .pth files; p itself is already first


_fix_sys_path()

import json  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.histogram_supported = hasattr(pb_utils.MetricFamily, "HISTOGRAM")
        if self.histogram_supported:
            self.fam = pb_utils.MetricFamily(name="echo_chars_per_request", description="chars echoed",
                                             kind=pb_utils.MetricFamily.HISTOGRAM)
            self.hist = self.fam.Metric(labels={"model": "echo"}, buckets=[1.0, 10.0, 100.0])
        self.threads = []
        # the 2.51 Python backend crashes the server when Python threads call into the stub's IPC concurrently
        # (sends, metrics): serialise them (deepseek_v4's model.py uses one dispatcher thread instead)
        self.ipc = threading.Lock()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
                text = raw.reshape(-1)[0]
                text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
                st = pb_utils.get_input_tensor_by_name(request, "stream")
                stream = bool(st.as_numpy().reshape(-1)[0]) if st is not None else False
            except Exception as e:  # noqa: BLE001
                with self.ipc:
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"echo: bad input: {e}")),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            t = threading.Thread(target=self._respond, args=(sender, text, stream), daemon=True)
            t.start()
            self.threads.append(t)
        self.threads = [t for t in self.threads if t.is_alive()]
        return None

    def _respond(self, sender, text, stream):
        info = json.dumps({"numpy": np.__version__, "numpy_file": np.__file__, "sys_path_head": sys.path[:3],
                           "histogram": self.histogram_supported, "python": sys.version.split()[0]})
        pieces = list(text) if stream else [text]
        for i, piece in enumerate(pieces):
            outs = [pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=np.object_))]
            if i == 0:
                outs.append(pb_utils.Tensor("stub_info", np.array([info.encode()], dtype=np.object_)))
            with self.ipc:
                sender.send(pb_utils.InferenceResponse(output_tensors=outs))
        with self.ipc:
            if self.histogram_supported:
                self.hist.observe(float(len(text)))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for t in self.threads:
            t.join(timeout=5)
