// PLACEHOLDER: qkv backward (being written).
#include "commands.h"
