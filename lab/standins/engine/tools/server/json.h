#pragma once

// Just enough JSON for the fixture server: parse a request body into a tree, write values back.

#include <string>
#include <utility>
#include <vector>

struct json_value {
    enum kind_t { null_v, bool_v, number_v, string_v, array_v, object_v };
    kind_t kind = null_v;
    bool boolean = false;
    std::string text;                                         // a string, or a number as written
    std::vector<json_value> items;                            // an array
    std::vector<std::pair<std::string, json_value>> members;  // an object, in order

    // The member named key of an object, or nullptr.
    const json_value * get(const std::string & key) const;
    bool is_string(const std::string & s) const { return kind == string_v && text == s; }
};

// False when text is not one JSON value (surrounding whitespace allowed).
bool json_parse(const std::string & text, json_value & out);
std::string json_dump(const json_value & v);
std::string json_str(const std::string & s);
