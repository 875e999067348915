// Entry point of the qrloss command-line tool: parses the command line and
// runs the selected subcommand.

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <new>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "commands.hpp"

// meson.build passes the project version; this fallback serves other builds.
#ifndef QRLOSS_VERSION
#define QRLOSS_VERSION "unknown"
#endif

namespace qrloss::cli {

namespace {

// Returns the length of the well-formed UTF-8 sequence that starts at
// text[k] and encodes a character other than a C1 control, or 0.
std::size_t utf8_length(const std::string& text, std::size_t k) {
  const auto at = [&](std::size_t j) {
    return static_cast<unsigned char>(text[j]);
  };
  const unsigned char lead = at(k);
  // Bounds of the second byte rule out overlong forms, surrogates and
  // code points above U+10FFFF.
  unsigned char low = 0x80;
  unsigned char high = 0xbf;
  std::size_t length = 0;
  if (lead >= 0xc2 && lead <= 0xdf) {
    length = 2;
    if (lead == 0xc2) low = 0xa0;  // U+0080 to U+009F are C1 controls
  } else if (lead >= 0xe0 && lead <= 0xef) {
    length = 3;
    if (lead == 0xe0) low = 0xa0;
    if (lead == 0xed) high = 0x9f;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    length = 4;
    if (lead == 0xf0) low = 0x90;
    if (lead == 0xf4) high = 0x8f;
  } else {
    return 0;
  }
  if (k + length > text.size() || at(k + 1) < low || at(k + 1) > high) {
    return 0;
  }
  for (std::size_t j = 2; j < length; ++j) {
    if (at(k + j) < 0x80 || at(k + j) > 0xbf) return 0;
  }
  return length;
}

// Escapes control characters (line breaks and C1 controls included) and
// bytes that are not well-formed UTF-8 as \xNN, so that every error is one
// line on stderr and cannot drive the terminal.
std::string one_line(const std::string& text) {
  std::string line;
  std::size_t k = 0;
  while (k < text.size()) {
    const auto byte = static_cast<unsigned char>(text[k]);
    const std::size_t length = byte < 0x80 ? 1 : utf8_length(text, k);
    if (byte < 0x20 || byte == 0x7f || length == 0) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", byte);
      line += escaped;
      ++k;
    } else {
      line.append(text, k, length);
      k += length;
    }
  }
  return line;
}

// Quotes each argument and joins them with commas.
std::string quote_all(const std::vector<std::string>& arguments) {
  std::string list;
  for (const std::string& argument : arguments) {
    list += (list.empty() ? "'" : ", '") + one_line(argument) + "'";
  }
  return list;
}

// An argument that CLI11 left unparsed, and its position on the command
// line.
using Leftover = std::pair<std::size_t, std::string>;

// Finds the positions of the leftovers in `arguments`. A leftover that CLI11
// rewrote, so that it matches no argument verbatim, gets the position past
// the end.
std::vector<Leftover> locate(std::vector<std::string> leftovers,
                             const std::vector<std::string>& arguments) {
  std::vector<Leftover> located;
  for (std::size_t k = 0; k < arguments.size() && !leftovers.empty(); ++k) {
    const auto found =
        std::find(leftovers.begin(), leftovers.end(), arguments[k]);
    if (found != leftovers.end()) {
      located.emplace_back(k, arguments[k]);
      leftovers.erase(found);
    }
  }
  for (const std::string& rest : leftovers) {
    located.emplace_back(arguments.size(), rest);
  }
  return located;
}

// Names one or more unexpected arguments.
std::string unexpected(const std::vector<std::string>& arguments) {
  return (arguments.size() == 1 ? "unexpected argument "
                                : "unexpected arguments ") +
         quote_all(arguments);
}

// Rewords the CLI11 parse errors that do not quote the argument or read
// oddly. Other errors pass through as one line. `command` is the parsed
// command, or null when parsing stopped before one.
std::string usage_message(const CLI::ParseError& error, const CLI::App& app,
                          const CLI::App* command,
                          const std::vector<std::string>& arguments) {
  const std::string message = one_line(error.what());
  const bool extras = dynamic_cast<const CLI::ExtrasError*>(&error) != nullptr;
  const bool required =
      dynamic_cast<const CLI::RequiredError*>(&error) != nullptr;
  // Words after "--" also stay with the top level, so leftovers count as
  // before the command by their position.
  std::vector<Leftover> located = locate(app.remaining(), arguments);
  std::size_t command_at = 0;
  if (command != nullptr) {
    command_at = static_cast<std::size_t>(
        std::find(arguments.begin(), arguments.end(), command->get_name()) -
        arguments.begin());
    const std::vector<Leftover> inside = locate(command->remaining(), arguments);
    located.insert(located.end(), inside.begin(), inside.end());
    std::stable_sort(located.begin(), located.end(),
                     [](const Leftover& x, const Leftover& y) {
                       return x.first < y.first;
                     });
  }
  std::vector<std::string> before;
  std::vector<std::string> leftovers;
  for (const Leftover& leftover : located) {
    if (leftover.first < command_at) before.push_back(leftover.second);
    leftovers.push_back(leftover.second);
  }

  if ((extras || required) && !before.empty()) {
    return unexpected(before) + " before the command: options go after '" +
           command->get_name() + "'";
  }
  if (extras && !leftovers.empty()) {
    if (command == nullptr && leftovers.front()[0] != '-') {
      return "unknown command '" + one_line(leftovers.front()) +
             "': give eval or bench";
    }
    return unexpected(leftovers);
  }
  // CLI11 checks required options before it reports leftovers, so a
  // misspelt "--los qr" would read as "--loss is required" alone.
  if (required && !leftovers.empty()) {
    return unexpected(leftovers) + "; " + message;
  }
  // CLI11 words a repeated option as "--eps: At Most 1 required but
  // received 2", and a missing value as "--eps: 1 required X missing".
  static const std::regex repeated(
      R"(^(\S+): At Most 1 required but received ([0-9]+)$)");
  static const std::regex no_value(R"(^(\S+): 1 required (\S+) missing$)");
  std::smatch match;
  if (std::regex_match(message, match, repeated)) {
    return match[1].str() + ": given " + match[2].str() +
           " times; give it once";
  }
  if (std::regex_match(message, match, no_value)) {
    return match[1].str() + ": missing value: give " + match[1].str() + " " +
           match[2].str();
  }
  return message;
}

// Splits "--name=" into "--name" and an empty value. CLI11 would take the
// next argument as the value, and blame that argument.
std::vector<std::string> split_empty_values(int argc, char** argv) {
  std::vector<std::string> arguments;
  for (int k = 1; k < argc; ++k) {
    const std::string argument = argv[k];
    const std::size_t equals = argument.find('=');
    if (argument.rfind("--", 0) == 0 && equals > 2 &&
        equals == argument.size() - 1) {
      arguments.push_back(argument.substr(0, equals));
      arguments.emplace_back();
    } else {
      arguments.push_back(argument);
    }
  }
  return arguments;
}

}  // namespace

CLI::Validator int_in_range(int minimum, int maximum) {
  // The help text of each option states the range, so the validator adds no
  // description to the usage line.
  return CLI::Validator(
      [minimum, maximum](std::string& text) -> std::string {
        const char* begin = text.c_str();
        char* end = nullptr;
        errno = 0;
        // strtol would skip leading white space, which --eps rejects.
        const long value = std::strtol(begin, &end, 10);
        if (end == begin || *end != '\0' || errno == ERANGE ||
            std::isspace(static_cast<unsigned char>(text[0])) != 0 ||
            value < minimum || value > maximum) {
          return "expected an integer from " + std::to_string(minimum) +
                 " to " + std::to_string(maximum) + ", got '" +
                 one_line(text) + "'";
        }
        return {};
      },
      "");
}

CLI::Validator one_of(const std::vector<std::string>& choices) {
  std::string listed;
  std::string braced;
  for (std::size_t k = 0; k < choices.size(); ++k) {
    if (k + 1 == choices.size() && k > 0) {
      listed += " or ";
    } else if (k > 0) {
      listed += ", ";
    }
    listed += choices[k];
    braced += (k == 0 ? "{" : ",") + choices[k];
  }
  braced += "}";
  return CLI::Validator(
      [choices, listed](std::string& text) -> std::string {
        if (std::find(choices.begin(), choices.end(), text) != choices.end()) {
          return {};
        }
        return "expected " + listed + ", got '" + one_line(text) + "'";
      },
      braced);
}

CLI::Validator file_path() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        return text.empty() ? "expected a file path, got an empty string"
                            : "";
      },
      "");
}

void print_result(const std::string& command, const std::string& json,
                  const std::string& after_failure) {
  // The write(2) under std::cout sets errno when it fails, so errno is
  // cleared first: a stale value would name the wrong cause.
  errno = 0;
  std::cout << json << std::endl;
  if (std::cout) return;
  const int error_number = errno;
  std::string message = "cannot write the result to stdout";
  if (error_number != 0) {
    message += ": " + std::string(std::strerror(error_number));
  }
  fail_command(command, kExitInternal, message + after_failure);
}

void fail_command(const std::string& command, int exit_status,
                  const std::string& message) {
  std::cerr << "qrloss " << command << ": " << one_line(message) << std::endl;
  throw CLI::RuntimeError(exit_status);
}

}  // namespace qrloss::cli

int main(int argc, char** argv) {
  namespace cli = qrloss::cli;
  // With SIGPIPE ignored, printing to a pipe whose reader has exited fails
  // with EPIPE, so the stdout error path reports it and exits 1, as for a
  // full disk, instead of the process ending silently on the signal.
  std::signal(SIGPIPE, SIG_IGN);

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

  const std::vector<std::string> arguments =
      cli::split_empty_values(argc, argv);
  try {
    // CLI11 takes the arguments in reverse order.
    std::vector<std::string> reversed(arguments.rbegin(), arguments.rend());
    app.parse(reversed);
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
    const CLI::App* command = nullptr;
    for (const CLI::App* parsed : app.get_subcommands()) {
      prefix = "qrloss " + parsed->get_name();
      command = parsed;
    }
    std::cerr << prefix << ": "
              << cli::usage_message(error, app, command, arguments)
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
