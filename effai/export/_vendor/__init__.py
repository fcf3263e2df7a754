"""Third-party code vendored unmodified, each file with its origin and licence in its header.

- tflite_metadata_schema.py: the TFLite Metadata schema (flatc-generated Python) from tflite-support 0.4.4,
  Apache-2.0 (LICENSE-tflite-support). effai.export.metadata writes and tests read TFLite metadata with it.
"""
