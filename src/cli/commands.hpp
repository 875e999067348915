#pragma once
// Subcommands of the qrloss command-line tool and the error convention they
// share.

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace qrloss::cli {

/// Exit status for bad usage or bad input: a parse error, a missing or
/// malformed file, mismatched inputs, or values the library rejects.
inline constexpr int kExitUsage = 2;

/// Exit status for an internal error, such as running out of memory.
inline constexpr int kExitInternal = 1;

/// Adds `eval`, which computes a loss and optionally its gradient from
/// .npy files and prints one JSON object.
void add_eval_command(CLI::App& app);

/// Adds `bench`, which times the loss on synthetic inputs.
void add_bench_command(CLI::App& app);

/// Returns a validator that accepts a decimal integer from `minimum` to
/// `maximum`; CLI11's number validators print their double limits in full.
CLI::Validator int_in_range(int minimum, int maximum);

/// The largest --threads that eval and bench accept. It rejects typing
/// mistakes such as 20000, which would otherwise start up to that many
/// threads.
inline constexpr int kMaxThreads = 4096;

/// Returns a validator that accepts one of `choices` and quotes any other
/// value in its message.
CLI::Validator one_of(const std::vector<std::string>& choices);

/// Returns a validator that rejects an empty file path.
CLI::Validator file_path();

/// Prints `json` and a newline on stdout. If that fails, throws through
/// fail_command with status 1 and "cannot write the result to stdout",
/// followed by the system's reason (a full disk, a closed pipe) and then
/// `after_failure`, which names what is left behind.
void print_result(const std::string& command, const std::string& json,
                  const std::string& after_failure = "");

/// Prints `qrloss <command>: <message>` as one line on stderr and throws
/// CLI::RuntimeError(exit_status), which main() turns into the exit status
/// without printing anything else.
[[noreturn]] void fail_command(const std::string& command, int exit_status,
                               const std::string& message);

}  // namespace qrloss::cli
