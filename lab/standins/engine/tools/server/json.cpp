#include "json.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

struct parser {
    const std::string & s;
    size_t i = 0;
    int depth = 0;

    void ws() {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) {
            ++i;
        }
    }

    bool literal(const char * word) {
        size_t n = strlen(word);
        if (s.compare(i, n, word) != 0) {
            return false;
        }
        i += n;
        return true;
    }

    static void utf8(std::string & out, unsigned cp) {
        if (cp < 0x80) {
            out += (char) cp;
        } else if (cp < 0x800) {
            out += (char) (0xC0 | (cp >> 6));
            out += (char) (0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += (char) (0xE0 | (cp >> 12));
            out += (char) (0x80 | ((cp >> 6) & 0x3F));
            out += (char) (0x80 | (cp & 0x3F));
        } else {
            out += (char) (0xF0 | (cp >> 18));
            out += (char) (0x80 | ((cp >> 12) & 0x3F));
            out += (char) (0x80 | ((cp >> 6) & 0x3F));
            out += (char) (0x80 | (cp & 0x3F));
        }
    }

    bool hex4(unsigned & cp) {
        if (i + 4 > s.size()) {
            return false;
        }
        char buf[5] = {s[i], s[i + 1], s[i + 2], s[i + 3], 0};
        char * end = nullptr;
        cp = (unsigned) strtoul(buf, &end, 16);
        i += 4;
        return end == buf + 4;
    }

    bool string(std::string & out) {
        if (i >= s.size() || s[i] != '"') {
            return false;
        }
        ++i;
        while (i < s.size() && s[i] != '"') {
            char c = s[i++];
            if ((unsigned char) c < 0x20) {
                return false;
            }
            if (c != '\\') {
                out += c;
                continue;
            }
            if (i >= s.size()) {
                return false;
            }
            char e = s[i++];
            switch (e) {
                case '"': case '\\': case '/': out += e; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = 0;
                    if (!hex4(cp)) {
                        return false;
                    }
                    if (cp >= 0xD800 && cp < 0xDC00 && s.compare(i, 2, "\\u") == 0) {
                        unsigned lo = 0;
                        i += 2;
                        if (!hex4(lo) || lo < 0xDC00 || lo > 0xDFFF) {
                            return false;
                        }
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    utf8(out, cp);
                    break;
                }
                default: return false;
            }
        }
        if (i >= s.size()) {
            return false;
        }
        ++i;
        return true;
    }

    bool value(json_value & v) {
        if (++depth > 64) {
            return false;
        }
        ws();
        bool ok = false;
        if (i >= s.size()) {
            ok = false;
        } else if (s[i] == '{') {
            v.kind = json_value::object_v;
            ++i;
            ws();
            ok = i < s.size() && s[i] == '}';
            if (ok) {
                ++i;
            }
            while (!ok) {
                std::pair<std::string, json_value> m;
                ws();
                if (!string(m.first)) {
                    break;
                }
                ws();
                if (i >= s.size() || s[i] != ':') {
                    break;
                }
                ++i;
                if (!value(m.second)) {
                    break;
                }
                v.members.push_back(std::move(m));
                ws();
                if (i < s.size() && s[i] == ',') {
                    ++i;
                } else {
                    ok = i < s.size() && s[i] == '}';
                    ++i;
                    break;
                }
            }
        } else if (s[i] == '[') {
            v.kind = json_value::array_v;
            ++i;
            ws();
            ok = i < s.size() && s[i] == ']';
            if (ok) {
                ++i;
            }
            while (!ok) {
                json_value item;
                if (!value(item)) {
                    break;
                }
                v.items.push_back(std::move(item));
                ws();
                if (i < s.size() && s[i] == ',') {
                    ++i;
                } else {
                    ok = i < s.size() && s[i] == ']';
                    ++i;
                    break;
                }
            }
        } else if (s[i] == '"') {
            v.kind = json_value::string_v;
            ok = string(v.text);
        } else if (literal("true")) {
            v.kind = json_value::bool_v;
            v.boolean = ok = true;
        } else if (literal("false")) {
            v.kind = json_value::bool_v;
            ok = true;
        } else if (literal("null")) {
            ok = true;
        } else {
            const char * start = s.c_str() + i;
            char * end = nullptr;
            strtod(start, &end);
            ok = end != start && (*start == '-' || (*start >= '0' && *start <= '9'));
            v.kind = json_value::number_v;
            v.text.assign(start, end - start);
            i += end - start;
        }
        --depth;
        return ok;
    }
};

}  // namespace

const json_value * json_value::get(const std::string & key) const {
    for (const auto & m : members) {
        if (m.first == key) {
            return &m.second;
        }
    }
    return nullptr;
}

bool json_parse(const std::string & text, json_value & out) {
    parser p{text};
    out = json_value{};
    if (!p.value(out)) {
        return false;
    }
    p.ws();
    return p.i == text.size();
}

std::string json_str(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof(buf), "\\u%04x", c);
                    out += buf;
                } else {
                    out += (char) c;
                }
        }
    }
    return out + "\"";
}

std::string json_dump(const json_value & v) {
    switch (v.kind) {
        case json_value::null_v: return "null";
        case json_value::bool_v: return v.boolean ? "true" : "false";
        case json_value::number_v: return v.text;
        case json_value::string_v: return json_str(v.text);
        case json_value::array_v: {
            std::string out = "[";
            for (size_t k = 0; k < v.items.size(); ++k) {
                out += (k ? "," : "") + json_dump(v.items[k]);
            }
            return out + "]";
        }
        case json_value::object_v: {
            std::string out = "{";
            for (size_t k = 0; k < v.members.size(); ++k) {
                out += (k ? "," : "") + json_str(v.members[k].first) + ":" + json_dump(v.members[k].second);
            }
            return out + "}";
        }
    }
    return "null";
}
