"""Every flag of train.py, in one parser that train.py and the recipes share.

    from recipes.flags import build_parser, stage_args
    args = build_parser().parse_args(argv)              # the command line
    args = stage_args({"stage": "sft", "lr": 1e-3})     # a recipe's stage: the same defaults

It lives here, below train.py, so that recipes build their stages' flags from the same parser the
command line uses without importing train.py (which only parses and dispatches).

Defaults never reject a valid run. A flag whose fitting value depends on the run (the number of
ranks, --max-steps, the data) defaults to None; the stage's own flag check (run by
recipes.stages.check_stage before the run directory is touched) fills it with a value that fits,
says so on the console and lists it in `args.defaulted` (and so in config.json); the stage may
shrink it further once it has read the data (data.datasets.fit_global_batch). A value given on the
command line is used as given and checked.

    --warmup-steps      a tenth of --max-steps, at most 10             runtime.optim.check_training_flags
    --batch-size        32 rounded up to a multiple of the ranks;      sft.loop.check_flags
                        at most the documents there are
    --prompts-per-step  16 rounded up to a multiple of the ranks;      rl.loop.check_flags
                        at most the prompts there are
    --keep-if           full marks on each verifiable --reward         evaluation.generate_stage.check_flags
    --eval-task         from the held-out rows                         evaluation.evaluate.infer_task
"""
from __future__ import annotations

import argparse

STAGES = ("pretrain", "sft", "grpo", "generate", "eval", "serve", "compare", "pass-rate")
RECIPES = ("r1-tiny", "tool-tiny", "opd-tiny")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="The DeepSeek-R1 recipe: pretrain, SFT, GRPO, rejection-sampling "
        "generation and evaluation, one stage at a time or as a whole recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    # what to run
    g = p.add_argument_group("what to run")
    g.add_argument("--config", default=None,
                   help="a YAML file of flags (keys: the long flags' names; recipes/*.yaml); flags on the command "
                   "line override it (recipes/config_file.py)")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="run one stage; without it the --recipe runs")
    g.add_argument("--recipe", choices=RECIPES, default="r1-tiny",
                   help="a named chain of stages (used when --stage is not given)")
    g.add_argument("--from-run", default="runs/r1-tiny",
                   help="--recipe opd-tiny: the finished r1-tiny run whose data, final_rl teacher and traces it uses")
    g.add_argument("--recipe-smoke", action="store_true",
                   help="run every stage of the recipe for a step or two on small data: checks that the stages "
                   "chain and the summary is written, not the figures")

    # run directory
    g = p.add_argument_group("run directory")
    g.add_argument("--out", default=None, help="run directory (default: runs/<recipe or stage>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint instead of starting anew")
    g.add_argument("--dry-run", action="store_true",
                   help="prepare the run directory, write config.json, print the flags and exit")

    # experiment tracking (runtime/trackers.py)
    g = p.add_argument_group("experiment tracking")
    g.add_argument("--report-to", default="none",
                   help="mirror metrics.jsonl (sft, pretrain, grpo) to none or a comma-separated list of wandb, "
                   "tensorboard (event files under <run>/tensorboard/); WANDB_MODE=offline works without a network")
    g.add_argument("--wandb-project", default="r1-recipe", help="the wandb project of --report-to wandb")
    g.add_argument("--log-rollouts-every", type=int, default=0,
                   help="grpo: every K steps, write --log-rollouts-n rollouts (prompt, completion, each reward, "
                   "advantage, finish reason) to <run>/rollouts.jsonl, and a wandb table (0: never)")
    g.add_argument("--log-rollouts-n", type=int, default=8, help="rollouts per --log-rollouts-every step (rank 0's first)")

    # reproducibility
    g = p.add_argument_group("reproducibility")
    g.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")

    # model and tokenizer
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="Hugging Face model folder to start from")
    g.add_argument("--preset", default=None, help="start from fresh weights of a named size (tiny, tiny-moe, ...)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the --model folder)")
    g.add_argument("--chat-template", default=None,
                   help="chat template: 'r1-zero', 'chatml' or a Jinja file/source (default: the tokenizer's)")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="train past the checkpoint's length: the model's new max_position_embeddings (written into "
                   "the exported config.json); usually with --rope-theta or --rope-scaling")
    g.add_argument("--rope-theta", type=float, default=None,
                   help="override the checkpoint's rope base (e.g. 300000 to extend a 4k Qwen2.5-Math to 32k)")
    g.add_argument("--rope-scaling", default=None,
                   help="override the checkpoint's rope_scaling, as JSON, e.g. "
                   "'{\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}'; "
                   "'none' removes it")

    # precision and distribution
    g = p.add_argument_group("precision and distribution")
    g.add_argument("--param-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype of the parameters (FSDP2 mixed precision; the master weights, the optimizer, "
                   "gradient reductions, norms' statistics, softmax, log-probs and losses stay fp32; so does the MoE "
                   "router). auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--export-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype of the Hugging Face folders checkpoints export (auto: the --model checkpoint's own "
                   "dtype; fp32 for a --preset)")
    g.add_argument("--no-sync-accumulation", action="store_true",
                   help="keep unsharded gradients across the micro-batches of a step and reduce-scatter once (faster "
                   "for small models; costs a full fp32 gradient per rank). Default: reduce-scatter every micro-batch")
    g.add_argument("--dist-timeout-s", type=float, default=None,
                   help="timeout of the collectives of a step (default: $R1_DIST_TIMEOUT_S or 600). Rank-0-only work "
                   "(checkpoint publication, HF export) is waited for on a gloo side group, not under this timeout")

    # data
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="training data: JSONL/Parquet (pretrain: text; sft: conversations)")
    g.add_argument("--prompt-column", default="prompt",
                   help="grpo/generate: the column holding the problem text when rows have no 'messages' "
                        "(e.g. 'problem' for OpenR1-Math-220k)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per packed row / longest document")
    g.add_argument("--overlong", choices=("drop", "truncate", "error"), default="drop",
                   help="what to do with a document longer than --seq-len (counted and reported)")
    g.add_argument("--no-packing", action="store_true", help="pad each document to the batch's longest instead")

    # optimisation
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per optimizer step, all ranks together (default: 32 rounded up to a multiple of "
                   "the ranks, at most the documents there are)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward on one rank")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at lr * this")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps (default: a tenth of --max-steps, at most 10)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many optimizer steps in a row with a non-finite loss or gradient")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile each transformer block for training and the no-grad log-prob passes "
                   "(the sampler stays eager). auto: on where it was measured to win within a run "
                   "(model.build.compile_enabled)")

    # LoRA (model/lora.py): adapters on chosen linear layers, the base frozen
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="train low-rank adapters of this rank instead of every weight (sft, grpo; 0: full "
                   "fine-tuning). Checkpoints then hold the merged model in hf/ and a PEFT adapter in adapter/")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default: 2 x --lora-rank)")
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated linear layer names to adapt, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj or MLA's q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj. all-linear: "
                   "every one of those the model has. Never the output head or routed experts (their weights run "
                   "through the MoE's grouped kernel); a shared expert's projections are targets")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-rslora", action="store_true", help="rsLoRA scaling: alpha / sqrt(rank) instead of alpha / rank")
    g.add_argument("--lora-init", default=None,
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, made by peft or "
                   "by a run here) to start from (sft, grpo) or to sample with (eval, generate, serve); its config "
                   "sets the rank, alpha and targets")

    # GRPO (--stage grpo). Paper option sets: --variant grpo|dapo|dr_grpo|gspo (rl/loss.py VARIANTS);
    # an explicit flag overrides the variant's value. Defaults without a variant: DAPO's token-mean
    # aggregation, eps 0.2 both sides, beta 0 (TRL's defaults).
    g = p.add_argument_group("GRPO")
    g.add_argument("--variant", choices=("grpo", "dapo", "dr_grpo", "gspo", "opd"), default=None,
                   help="a paper's option set: grpo (DeepSeekMath: seq-mean-token-mean, beta 0.04, k3), dapo "
                   "(token-mean, eps_high 0.28), dr_grpo (token-sum / (B * max_new_tokens), no std scaling), "
                   "gspo (sequence ratio, eps 3e-4/4e-4), opd (on-policy distillation from --teacher: the per-token reverse KL "
                   "as the only advantage)")
    g.add_argument("--teacher", default=None,
                   help="on-policy distillation: a frozen teacher checkpoint (the student's tokenizer) that scores "
                   "every sampled token; its log-prob minus the student's is each token's advantage (rl/distill.py)")
    g.add_argument("--distill-coef", type=float, default=0.0,
                   help="weight of the per-token distillation advantage added to GRPO's (with --teacher; "
                   "--variant opd uses it alone)")
    g.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    g.add_argument("--prompts-per-step", type=int, default=None,
                   help="prompts per RL step, all ranks together (default: 16 rounded up to a multiple of the "
                   "ranks, at most the prompts there are)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus mass")
    g.add_argument("--top-k", type=int, default=0, help="rollout top-k (0: off)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="completion budget of rollouts")
    g.add_argument("--eps-low", type=float, default=None, help="PPO clip below 1 - eps_low (default 0.2)")
    g.add_argument("--eps-high", type=float, default=None, help="PPO clip above 1 + eps_high (DAPO clip-higher: 0.28)")
    g.add_argument("--dual-clip", type=float, default=None, help="dual clip constant for negative advantages (e.g. 3)")
    g.add_argument("--beta", type=float, default=None, help="KL weight to the frozen reference model (0: no reference)")
    g.add_argument("--kl", choices=("k1", "k2", "k3"), default=None, help="KL estimator (k3 as DeepSeekMath)")
    g.add_argument("--loss-agg", default=None,
                   choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "bnpo"),
                   help="loss aggregation: token_mean (DAPO), seq_mean_token_mean (GRPO), "
                   "seq_mean_token_sum_norm (Dr. GRPO), bnpo")
    g.add_argument("--ratio-level", choices=("token", "sequence"), default=None, help="sequence = GSPO")
    g.add_argument("--scale-rewards", choices=("group", "batch", "none"), default=None,
                   help="advantage normalisation by the group's std (GRPO), the batch's, or none (Dr. GRPO)")
    g.add_argument("--advantage-estimator", choices=("grpo", "rloo"), default=None, help="group mean or leave-one-out")
    g.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight")
    g.add_argument("--tis-cap", type=float, default=0.0,
                   help="truncated importance sampling cap C on exp(old - rollout logp) (0: off)")
    g.add_argument("--mu", type=int, default=1, help="passes over each rollout batch (policy updates per batch)")
    g.add_argument("--num-minibatches", type=int, default=1, help="optimizer steps per pass over a rollout batch")
    g.add_argument("--micro-batch-tokens", type=int, default=8192, help="tokens per forward/backward (packed)")
    g.add_argument("--recompute-old-logp", action="store_true",
                   help="recompute old log-probs with the trainer even when mu = 1 (default: the sampler's)")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="drop groups whose rewards are all equal and sample more prompts (DAPO)")
    g.add_argument("--max-sampling-tries", type=int, default=4, help="rollout rounds per step with --dynamic-sampling")
    g.add_argument("--mask-truncated", action="store_true", help="no loss on completions cut by --max-new-tokens")
    g.add_argument("--ref-refresh-every", type=int, default=0, help="copy the policy into the reference every N steps")
    g.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine", help="lr decay shape")
    g.add_argument("--eval-samples", type=int, default=4,
                   help="GRPO held-out evaluation: samples per problem at temperature 1.0 besides greedy")

    # held-out evaluation during training
    g = p.add_argument_group("held-out evaluation during training")
    g.add_argument("--eval-data", default=None, help="JSONL of held-out problems (prompt + answer columns)")
    g.add_argument("--eval-task", default=None, choices=("arithmetic", "countdown", "math", "code"),
                   help="how the held-out answers are checked (default: from the rows: their 'task' column for "
                   "the synthetic tasks, code for rows with tests, else math)")
    g.add_argument("--eval-problems", type=int, default=200, help="held-out problems used (the first N)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="sampler slots in evaluation")
    # (the completion budget is --eval-max-new-tokens, shared with --stage eval)

    # checkpoints and logging
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--log-every-s", type=float, default=5.0, help="seconds between progress lines")

    # eval and generate (--stage eval: benchmark scores; --stage generate: rejection sampling)
    g = p.add_argument_group("eval and generate")
    g.add_argument("--eval-sets", default="math500",
                   help="comma-separated benchmark names (math500, aime24, gsm8k, humaneval) or JSONL/Parquet files")
    g.add_argument("--models", default=None,
                   help="--stage compare: model folders (evaluated with these eval flags) or finished eval run "
                   "directories, comma-separated: one table and bar chart across them and the sets")
    g.add_argument("--eval-n", type=int, default=4, help="samples per problem (pass@1 is their mean)")
    g.add_argument("--eval-k", default="", help="k values of pass@k and maj@k, e.g. 1,4,16 (each <= --eval-n; "
                   "default: 1 and --eval-n)")
    g.add_argument("--eval-temperature", type=float, default=0.6, help="sampling temperature (DeepSeek-R1: 0.6)")
    g.add_argument("--eval-top-p", type=float, default=0.95, help="nucleus sampling mass (DeepSeek-R1: 0.95)")
    g.add_argument("--eval-max-new-tokens", type=int, default=4096,
                   help="longest completion in tokens (DeepSeek-R1 evaluated with 32768)")
    g.add_argument("--eval-limit", type=int, default=0, help="only the first N problems of each set (0: all)")
    g.add_argument("--eval-save-logprobs", action="store_true",
                   help="write each sample's token ids and token log-probs into samples-<set>.jsonl")
    g.add_argument("--gen-n", type=int, default=4, help="completions sampled per prompt")
    g.add_argument("--gen-temperature", type=float, default=0.6, help="sampling temperature of generation")
    g.add_argument("--gen-top-p", type=float, default=0.95, help="nucleus sampling mass of generation")
    g.add_argument("--gen-max-new-tokens", type=int, default=4096, help="longest generated completion in tokens")
    g.add_argument("--gen-batch-prompts", type=int, default=16,
                   help="prompts per generation batch (the unit written, fsynced and resumed)")
    g.add_argument("--reward", default="accuracy,format",
                   help="comma-separated reward specs scored on each completion (verify.rewards names or "
                   "package.module:function); each score is recorded under its spec")
    g.add_argument("--keep-if", default=None,
                   help="conditions a completion must meet to be kept, e.g. accuracy>=1,format>=1,language>=0.95 "
                   "(names from --reward); 'none' keeps every completion (default: full marks on each verifiable "
                   "reward of --reward: accuracy, format, think_format, task, arithmetic, countdown, code)")
    g.add_argument("--pass-rate-min", type=float, default=0.0,
                   help="--stage pass-rate: keep prompts whose pass rate (samples meeting --keep-if / --gen-n) is at "
                   "least this")
    g.add_argument("--pass-rate-max", type=float, default=1.0, help="--stage pass-rate: ... and at most this")
    g.add_argument("--max-per-prompt", type=int, default=0, help="keep at most this many completions per prompt "
                   "(0: no cap); a prompt's identical completions are kept at most once")
    g.add_argument("--sampler-batch-size", type=int, default=64, help="sequences decoded at once (rows of a decode step)")
    g.add_argument("--sampler-cache-tokens", type=int, default=None,
                   help="KV cache budget of the rollout engine in tokens (pages of 16 positions); a sequence holds "
                   "pages only for what it has written and a prompt's samples share its pages (default: "
                   "--sampler-batch-size x the longest prompt + max new tokens)")
    g.add_argument("--sampler-cache-gib", type=float, default=None,
                   help="the KV cache budget in GiB instead of tokens")
    g.add_argument("--sampler-sync-every", type=int, default=None,
                   help="decode steps the device runs between host reads of the sampled tokens "
                   "(default: 4 on CPU, 8 on CUDA)")
    g.add_argument("--tools", default=None,
                   help="tools rollouts may call mid-reasoning, comma-separated (calculator); a call pauses the "
                   "sequence, the tool's output is appended to it (masked out of the loss) and it decodes on from its "
                   "own cache (default: none)")
    g.add_argument("--tool-format", default="fenced",
                   help="how calls are written: fenced (a ```calculator / ```python block, answered by an "
                   "```output block: ToRL / ReTool's convention) or qwen (Qwen2.5's <tool_call> JSON, answered by "
                   "a <tool_response> turn as its chat template renders it)")
    g.add_argument("--max-tool-calls", type=int, default=4, help="tool calls per rollout; one more ends it ('length')")
    g.add_argument("--max-rollout-tokens", type=int, default=None,
                   help="tokens of a rollout with tools, the model's and the tools' outputs together "
                   "(--max-new-tokens counts the model's alone; default: twice --max-new-tokens)")
    g.add_argument("--rollout-tp", type=int, default=1,
                   help="sample (GRPO rollouts, held-out evaluation, the eval and generate stages) with the model split "
                   "over this many ranks by tensor parallelism: attention heads, MLP rows, MoE experts and the "
                   "vocabulary divided, each rank holding 1/N of the weights and of a GQA model's KV cache; the "
                   "world size / N groups sample different prompts. Must divide the world size and the head, kv-head, "
                   "intermediate and expert counts (default 1: every rank samples with the whole model)")
    g.add_argument("--sampler-compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the rollout engine's decode step, one graph per batch and table-width "
                   "bucket; auto: on the CPU for models at least 512 wide (measured to win there), off on CUDA "
                   "until the GPU check has measured it")
    g.add_argument("--teacher-url", default=None,
                   help="--stage generate: sample from an OpenAI-compatible endpoint (vLLM, SGLang, a provider, our "
                   "--stage serve) instead of a local model, e.g. http://host:8000/v1; the prompts are sent as chat "
                   "messages and the endpoint applies its model's template")
    g.add_argument("--teacher-model", default=None, help="the endpoint's model name (default: the one it lists)")
    g.add_argument("--teacher-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the teacher endpoint's API key (unset: no key sent)")
    g.add_argument("--teacher-concurrency", type=int, default=16, help="teacher requests in flight at once")
    g.add_argument("--teacher-timeout-s", type=float, default=600.0, help="seconds one teacher request may take")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint of the model that --reward judge:FILE asks, e.g. http://host:8000/v1")
    g.add_argument("--judge-model", default=None,
                   help="with --judge-url: the endpoint's model name (default: the one it lists); without it: a local "
                   "checkpoint folder that judges in-process, greedy and batched on the rollout engine")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge endpoint's API key (unset: no key sent)")
    g.add_argument("--judge-concurrency", type=int, default=16, help="judge requests in flight at once")
    g.add_argument("--judge-timeout-s", type=float, default=60.0,
                   help="seconds one judge request may take; after the retries a judge that does not answer gives "
                   "no signal (None)")
    g.add_argument("--http-retries", type=int, default=3, help="retries of a failed teacher or judge request")
    g.add_argument("--rm-normalize", choices=("none", "sigmoid", "batch"), default="none",
                   help="--reward rm:DIR (a sequence-classification reward model): the raw score, its sigmoid, or "
                   "z-scored over the scored batch")
    g.add_argument("--reward-workers", type=int, default=2, help="reward scoring processes")
    g.add_argument("--reward-timeout-s", type=float, default=30.0,
                   help="seconds one scoring item may take before it counts as wrong (a code sandbox run needs "
                   "its own 5 s plus start-up)")

    # serve (--stage serve: an OpenAI-compatible endpoint over the rollout engine)
    g = p.add_argument_group("serve")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, see <run>/server.json)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients ask for (default: the --model folder's name, or the --preset)")
    g.add_argument("--serve-max-len", type=int, default=None,
                   help="longest prompt + completion served, in tokens (default: the model's max_position_embeddings)")
    return p


def stage_args(base: dict | None = None, **overrides) -> argparse.Namespace:
    """The flags of one stage as the command line would give them: the parser's defaults, then
    `base`, then `overrides` (flag names with underscores). An unknown name is an error."""
    args = build_parser().parse_args([])
    for key, value in {**(base or {}), **overrides}.items():
        if not hasattr(args, key):
            raise ValueError(f"stage setting {key!r} is not a train.py flag (--{key.replace('_', '-')})")
        setattr(args, key, value)
    return args
