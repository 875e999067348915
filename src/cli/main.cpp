// Entry point of the qrloss command-line tool: parses the command line and
// runs the selected subcommand.

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <new>
#include <regex>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "commands.hpp"

// meson.build passes the project version; this fallback serves other builds.
#ifndef QRLOSS_VERSION
#define QRLOSS_VERSION "unknown"
#endif

namespace qrloss::cli {

namespace {

// Replaces line breaks so that every error is one line on stderr.
std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  while (!text.empty() && text.back() == ' ') {
    text.pop_back();
  }
  return text;
}

// The arguments CLI11 left unparsed, in command-line order.
std::vector<std::string> leftovers_in_order(const CLI::App& parsed, int argc,
                                            char** argv) {
  std::vector<std::string> leftovers = parsed.remaining();
  std::vector<std::string> ordered;
  for (int k = 1; k < argc && !leftovers.empty(); ++k) {
    const auto found = std::find(leftovers.begin(), leftovers.end(), argv[k]);
    if (found != leftovers.end()) {
      ordered.emplace_back(argv[k]);
      leftovers.erase(found);
    }
  }
  // Leftovers that match no argument verbatim, if CLI11 rewrote any, come
  // last.
  ordered.insert(ordered.end(), leftovers.begin(), leftovers.end());
  return ordered;
}

// Rewords the CLI11 parse errors that do not quote the argument or read
// oddly. Other errors pass through as one line.
std::string usage_message(const CLI::ParseError& error, const CLI::App& parsed,
                          bool top_level, int argc, char** argv) {
  const std::string message = one_line(error.what());
  const std::vector<std::string> leftovers =
      leftovers_in_order(parsed, argc, argv);
  std::string quoted;
  for (const std::string& argument : leftovers) {
    quoted += (quoted.empty() ? "'" : ", '") + one_line(argument) + "'";
  }
  const std::string noun = leftovers.size() == 1 ? "unexpected argument "
                                                 : "unexpected arguments ";
  if (dynamic_cast<const CLI::ExtrasError*>(&error) != nullptr &&
      !leftovers.empty()) {
    if (top_level && leftovers.front()[0] != '-') {
      return "unknown command '" + one_line(leftovers.front()) +
             "': give eval or bench";
    }
    return noun + quoted;
  }
  // CLI11 checks required options before it reports leftovers, so a
  // misspelt "--los qr" would read as "--loss is required" alone.
  if (dynamic_cast<const CLI::RequiredError*>(&error) != nullptr &&
      !leftovers.empty()) {
    return noun + quoted + "; " + message;
  }
  // CLI11 words a repeated option as "--eps: At Most 1 required but
  // received 2".
  static const std::regex repeated(
      R"(^(\S+): At Most 1 required but received ([0-9]+)$)");
  std::smatch match;
  if (std::regex_match(message, match, repeated)) {
    return match[1].str() + ": given " + match[2].str() +
           " times; give it once";
  }
  return message;
}

}  // namespace

CLI::Validator int_at_least(int minimum) {
  // The help text of each option states the range, so the validator adds no
  // description to the usage line.
  return CLI::Validator(
      [minimum](std::string& text) -> std::string {
        const char* begin = text.c_str();
        char* end = nullptr;
        errno = 0;
        const long value = std::strtol(begin, &end, 10);
        if (end == begin || *end != '\0' || errno == ERANGE ||
            value < minimum || value > INT_MAX) {
          return "expected an integer from " + std::to_string(minimum) +
                 " to " + std::to_string(INT_MAX) +
                 ", got '" + text + "'";
        }
        return {};
      },
      "");
}

void fail_command(const std::string& command, int exit_status,
                  const std::string& message) {
  std::cerr << "qrloss " << command << ": " << one_line(message) << std::endl;
  throw CLI::RuntimeError(exit_status);
}

}  // namespace qrloss::cli

int main(int argc, char** argv) {
  namespace cli = qrloss::cli;

  CLI::App app{
      "QR and RQ losses (Rolf et al., \"Resolving label uncertainty with "
      "implicit generative models\", ICLR 2022) and their gradients, "
      "computed on arrays stored as NumPy .npy files.",
      "qrloss"};
  app.set_version_flag("--version", QRLOSS_VERSION,
                       "Print the qrloss version and exit");
  // A missing command is reported after parsing. Requiring one here would
  // report an unknown word such as "evalu" as a missing command instead.
  app.require_subcommand(0, 1);
  app.footer(
      "Run 'qrloss COMMAND --help' for the options of a command.\n"
      "Exit status: 0 on success, 2 for bad usage or bad input (the message "
      "on stderr starts with 'qrloss:' or 'qrloss COMMAND:'), 1 for an "
      "internal error.");

  cli::add_eval_command(app);
  cli::add_bench_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& error) {
    // A subcommand has already printed its message.
    return error.get_exit_code();
  } catch (const CLI::ParseError& error) {
    if (error.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) {
      return app.exit(error);  // --help or --version
    }
    // The message names the command being parsed, as the commands' own
    // errors do, and points to its help, which lists its options.
    std::string prefix = "qrloss";
    const CLI::App* parsed = &app;
    for (const CLI::App* command : app.get_subcommands()) {
      prefix = "qrloss " + command->get_name();
      parsed = command;
    }
    std::cerr << prefix << ": "
              << cli::usage_message(error, *parsed, parsed == &app, argc, argv)
              << " (run '" << prefix << " --help' for usage)" << std::endl;
    return cli::kExitUsage;
  } catch (const std::bad_alloc&) {
    std::cerr << "qrloss: internal error: out of memory" << std::endl;
    return cli::kExitInternal;
  } catch (const std::exception& error) {
    std::cerr << "qrloss: internal error: " << cli::one_line(error.what())
              << std::endl;
    return cli::kExitInternal;
  }
  if (app.get_subcommands().empty()) {
    std::cerr << "qrloss: missing command: give eval or bench (run 'qrloss "
                 "--help' for usage)"
              << std::endl;
    return cli::kExitUsage;
  }
  return 0;
}
