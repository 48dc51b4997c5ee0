// comfygate's account extension for ComfyUI's stock frontend: who is signed in, and signing out.
//
// The proxy adds this script to ComfyUI's /extensions list, so the frontend imports it like any
// custom node's script. It asks the proxy who is signed in (GET /comfygate/whoami), shows the
// name and a "Sign out" button in the top bar, and registers a "Sign out" command in the menu.
// Signing out posts the proxy's sign-out form (POST /logout with its CSRF value); without a
// browser session (a token typed into the URL...) it opens the confirmation page instead.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyButton } from "../../scripts/ui/components/button.js";
import { ComfyButtonGroup } from "../../scripts/ui/components/buttonGroup.js";

const SIGN_OUT = "Comfygate.SignOut";

async function whoami() {
  try {
    const response = await fetch(api.fileURL("/comfygate/whoami"), {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
    return response.ok ? await response.json() : null;
  } catch (error) {
    console.warn("comfygate: could not tell who is signed in", error);
    return null;
  }
}

function signOut(me) {
  if (!me || !me.sign_out) {
    window.location.assign(api.fileURL("/logout"));
    return;
  }
  const form = document.createElement("form");
  form.method = "post";
  form.action = me.sign_out.url;
  form.hidden = true;
  const csrf = document.createElement("input");
  csrf.type = "hidden";
  csrf.name = "csrf";
  csrf.value = me.sign_out.csrf;
  form.append(csrf);
  document.body.append(form);
  form.submit();
}

function topBar(me) {
  const user = new ComfyButton({
    icon: "account-circle",
    content: me.user, // textContent: a name is never read as markup
    tooltip: `Signed in as ${me.user}`,
    classList: "comfyui-button comfygate-user",
    enabled: false,
  });
  user.element.dataset.comfygate = "user";
  const out = new ComfyButton({
    icon: "logout",
    content: "Sign out",
    tooltip: "Sign out of ComfyUI",
    classList: "comfyui-button comfygate-sign-out",
    action: () => signOut(me),
  });
  out.element.dataset.comfygate = "sign-out";
  const group = new ComfyButtonGroup(user.element, out.element);
  group.element.id = "comfygate-account";
  return group;
}

const me = await whoami();

app.registerExtension({
  name: "comfygate.Account",
  commands: [
    {
      id: SIGN_OUT,
      label: me ? `Sign out (${me.user})` : "Sign out",
      menubarLabel: "Sign out",
      icon: "pi pi-sign-out",
      function: () => signOut(me),
    },
  ],
  menuCommands: [{ path: [], commands: [SIGN_OUT] }],
  setup() {
    const settingsGroup = app.menu?.settingsGroup?.element;
    if (!me || !settingsGroup) {
      return; // no top bar to add to (or nobody to show): the menu command remains
    }
    settingsGroup.before(topBar(me).element);
  },
});
