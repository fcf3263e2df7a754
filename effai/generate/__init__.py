"""effai's generation path: artifact dirs holding a static-KV-cache decoder .pte (effai.export.kv_decoder), the
tokenizer and a manifest; one generation loop over the ExecuTorch runtime or torch (parity); timing for bench.
Commands and numbers: docs/generate.md.
"""
