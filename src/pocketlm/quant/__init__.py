"""Quantization and GGUF interchange: block codecs (`codecs`), quantized layers (`linear`), GGUF writing
(`gguf_writer`, `gguf_export`), GGUF import of phi3/llama files (`gguf_import`) and the `pocketlm quantize` verb
(`commands`)."""
