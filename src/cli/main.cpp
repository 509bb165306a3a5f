// qlora: the command-line entry point.
#include "cli/commands.h"

int main(int argc, char** argv) { return qlora::cli::run(argc, argv); }
